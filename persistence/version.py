"""The version of the service, reported by ``GET /``."""

__version__ = "1.0.0"
