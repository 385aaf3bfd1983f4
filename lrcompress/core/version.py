"""The package version, importable from every layer (``lrcompress.__version__`` re-exports it)."""

__version__ = "0.1.0"
