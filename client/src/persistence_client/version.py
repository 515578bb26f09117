"""The client's version (the same as in client/pyproject.toml)."""

__version__ = "1.0.0"
