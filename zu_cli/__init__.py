"""zu: make a Hugging Face causal LM forget specific facts, and prove what it did.

``from zu_cli import unlearn, verify`` runs the CLI's pipeline from Python (api.py, docs/python.md).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "unlearn", "verify"]


def __getattr__(name: str):
    # The API is imported on first use: ``import zu_cli`` (e.g. by the CLI's --version) stays free of torch.
    if name in ("unlearn", "verify"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'zu_cli' has no attribute {name!r}")
