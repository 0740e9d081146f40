"""pcfast: fast predictive-coding networks in PyTorch."""

__version__ = "0.1.0"
