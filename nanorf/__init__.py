"""nanorf: a compact PyTorch reimplementation of Representation Forcing (arXiv 2605.31604)."""

__version__ = "0.1.0"
