"""convfactor: factorize the convolutions of trained PyTorch networks, then measure the result."""

__version__ = "0.1.0"
