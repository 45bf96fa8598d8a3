"""diffusion_lab: the shared package of the Diffusion Lab book. `diffusion_lab.profile()` says how much work a
chapter's cells do ("smoke", "demo" or "full"); everything else lives in its own flat module."""
from .utils import by_profile, profile

__all__ = ["by_profile", "profile"]
