"""udaseg: unsupervised domain adaptive semantic segmentation in plain PyTorch."""

__version__ = "0.1.0"
