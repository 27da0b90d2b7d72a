"""The version, in a leaf module that every layer may import without pulling in the package facade."""

__version__ = "0.1.0"
