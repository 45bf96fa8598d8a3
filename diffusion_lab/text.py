"""Words to vectors for chapter 10's tiny Stable Diffusion: captions made from measured digits, a word-level
tokenizer, a small transformer text encoder, and `PromptUNet`, the text encoder and a UNet trained as one network.

Captions come from each digit's label and its measured stroke thickness and slant (`data.style_attributes`):
each attribute is binned into thirds *within its digit* (the thinnest third of the sevens are "thin" sevens),
and a caption names any subset of the attributes that sit in an outer third, with synonyms and varied word order:
"a thick slanted seven", "thin upright 2", "7", "seven, bold and italic". The vocabulary is the caption grammar's
words, fixed in code, so a model file needs no learned tokenizer; a word outside it is an error naming close words.

The text encoder (Vaswani et al. 2017) is trained from scratch jointly with the denoiser, like Imagen's idea of
a text encoder feeding cross-attention (Saharia et al. 2022) but without any pretraining: nothing is downloaded.
The empty prompt is all padding; it encodes to the all-zero context, the UNet's null condition, so classifier-free
guidance (Ho & Salimans 2022) uses it as the unconditional model.
"""
from __future__ import annotations

import difflib
import re

import torch
from torch import nn

from .unet import UNet

PAD = "<pad>"
MAX_WORDS = 8
DIGIT_WORDS = (("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
               ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"))
# attribute -> (words for the low third, words for the high third); the middle third is never named
ATTRIBUTE_WORDS = {
    "thickness": (("thin", "light", "skinny", "fine"), ("thick", "bold", "heavy", "fat")),
    "slant": (("upright", "straight", "vertical", "level"), ("slanted", "italic", "leaning", "tilted")),
}
ATTRIBUTES = ("slant", "thickness")  # data.STYLE_ATTRIBUTES order: columns of data.style_attributes
AN_WORDS = ("eight", "8", "upright", "italic")  # words that take "an"
FILLERS = ("a", "an", "the", "digit", "number", "handwritten", "and")
VOCAB = (PAD, *FILLERS, *(w for pair in DIGIT_WORDS for w in pair),
         *(w for low, high in ATTRIBUTE_WORDS.values() for w in (*low, *high)))
# Combinations never captioned in training: (digit, attribute, bin). The images stay; their captions just never
# name that attribute, so the word and the digit never meet (measured in chapter 10 as compositional generalisation).
HELD_OUT = ((7, "thickness", 1), (0, "slant", 1))


class VocabularyError(ValueError):
    """A prompt uses a word outside the vocabulary, or is too long."""


def words(prompt: str) -> list[str]:
    """Lower-case words and single numerals: "A thick 7!" -> ["a", "thick", "7"]."""
    return re.findall(r"[a-z]+|[0-9]", prompt.lower())


def tokenize(prompts: list[str] | str, max_words: int = MAX_WORDS) -> torch.Tensor:
    """Prompts -> token ids (N, max_words) int64, padded with 0. The empty prompt is all zeros (the null prompt)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(prompts), max_words, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        found = words(prompt)
        unknown = [w for w in found if w not in index]
        if unknown:
            w = unknown[0]
            close = difflib.get_close_matches(w, VOCAB[1:], n=4, cutoff=0.5)
            hint = f"close words: {', '.join(close)}" if close else f"the words are: {' '.join(VOCAB[1:])}"
            raise VocabularyError(f"unknown word {w!r} in prompt {prompt!r}; {hint}")
        if len(found) > max_words:
            raise VocabularyError(f"prompt {prompt!r} has {len(found)} words; at most {max_words}")
        ids[row, : len(found)] = torch.tensor([index[w] for w in found], dtype=torch.long)
    return ids


def named_digit(prompt: str) -> int:
    """The digit a prompt names, or -1 when it names none (or more than one)."""
    digits = {d for d, pair in enumerate(DIGIT_WORDS) for w in words(prompt) if w in pair}
    return digits.pop() if len(digits) == 1 else -1


def named_attributes(prompt: str) -> dict[str, int]:
    """{attribute: -1 (low third) or +1 (high third)} for each attribute word the prompt uses."""
    found = {}
    for name, (low, high) in ATTRIBUTE_WORDS.items():
        for w in words(prompt):
            if w in low or w in high:
                found[name] = 1 if w in high else -1
    return found


def attribute_bins(attributes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 2) measured (slant, thickness) -> (N, 2) bins in {-1, 0, +1}: the lower, middle and upper third of
    each attribute among the digits with the same label."""
    bins = torch.zeros_like(attributes, dtype=torch.long)
    for d in labels.unique():
        rows = labels == d
        for j in range(attributes.shape[1]):
            values = attributes[rows, j]
            low, high = values.quantile(1 / 3), values.quantile(2 / 3)
            bins[rows, j] = (values > high).long() - (values < low).long()
    return bins


def caption(digit: int, bins: dict[str, int], u: list[float], held_out=HELD_OUT) -> str:
    """One random caption for a digit with attribute bins {"slant": -1/0/1, "thickness": -1/0/1}; the uniform
    numbers u (at least 8 in [0, 1)) make every choice, so a seeded generator gives the same captions again."""
    named = []
    for k, name in enumerate(ATTRIBUTES):
        b = bins[name]
        if b and u[k] < 0.6 and (digit, name, b) not in held_out:
            options = ATTRIBUTE_WORDS[name][b > 0]
            named.append(options[int(u[2 + k] * len(options))])
    if len(named) == 2 and u[4] < 0.5:
        named.reverse()
    number = DIGIT_WORDS[digit][int(u[5] * 2)]
    if u[6] < 0.25 and named:  # "seven, thick and slanted": the digit first
        return f"{number} {' and '.join(named)}"
    noun = f"digit {number}" if u[6] > 0.9 else number
    following = (*named, noun)[0].split()[0]
    article = ("an" if following in AN_WORDS else "a") if u[7] < 0.5 else ("the" if u[7] < 0.6 else "")
    return " ".join(w for w in (article, *named, noun) if w)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> context (B, L, width): word + position embeddings, a few pre-norm transformer layers.
    Padding positions come out as zero vectors, and an all-padding (empty) prompt as the all-zero context."""

    def __init__(self, vocab_size: int = len(VOCAB), width: int = 64, layers: int = 2, heads: int = 4,
                 max_words: int = MAX_WORDS):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        present = ids.ne(0)                                           # (B, L): real words
        empty = ~present.any(1)                                       # (B,): the null prompt
        pad_mask = ~present & ~empty[:, None]                         # an empty prompt attends to its pads (no NaN)
        h = self.token(ids) + self.position[: ids.shape[1]]          # (B, L, width)
        h = self.norm(self.layers(h, src_key_padding_mask=pad_mask))
        return h * present[..., None].to(h.dtype)                      # pads and empty prompts -> exact zeros


class PromptUNet(nn.Module):
    """The text encoder and a context UNet as one network, so one optimiser trains both from scratch.
    forward(x_t, t, context=ids (B, L) int64) -> the UNet's prediction; context=None or all-zero ids = null prompt.
    `config` rebuilds it (the vocabulary is stored too, so a file with other words is refused, not misread)."""

    def __init__(self, unet: dict, width: int = 64, layers: int = 2, vocab: list | None = None,
                 max_words: int = MAX_WORDS):
        super().__init__()
        vocab = list(VOCAB) if vocab is None else list(vocab)
        if vocab != list(VOCAB):
            raise ValueError("this network was trained with another vocabulary than diffusion_lab.text.VOCAB")
        self.config = dict(unet={**unet, "context_dim": width}, width=width, layers=layers, vocab=vocab,
                           max_words=max_words)
        self.text = TextEncoder(len(vocab), width, layers, max_words=max_words)
        self.unet = UNet(**self.config["unet"])
        self.context_dim, self.max_words = width, max_words

    def forward(self, x_t, t, labels=None, style=None, context=None):
        if context is not None:
            if context.dtype != torch.long or context.ndim != 2:
                raise ValueError(f"a PromptUNet takes token ids (B, L) int64 as context, got {context.dtype} "
                                 f"{tuple(context.shape)}; use text.tokenize")
            context = self.text(context)
        return self.unet(x_t, t, labels, style, context)
