"""zu: make a Hugging Face causal LM forget specific facts, and prove what it did."""

__version__ = "0.1.0"
