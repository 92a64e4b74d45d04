"""The package version (one place in Python; pyproject.toml holds the same number)."""

__version__ = "0.1.0"
"""caproj's version (pyproject.toml holds the same number)."""
