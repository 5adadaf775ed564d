"""The package version: kept equal to pyproject.toml's (a test compares them)."""

__version__ = "0.1.0.dev0"
