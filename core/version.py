"""memexport's version, in the bottom floor so every floor can record it without importing the top."""

__version__ = "0.1.0"
