"""certkit: certified robust training and sound verification of neural networks."""

__version__ = "0.1.0"
