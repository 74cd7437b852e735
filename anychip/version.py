"""The installed anychip version (a leaf: checkpoints and bench reports record it)."""

__version__ = "0.1.0"
