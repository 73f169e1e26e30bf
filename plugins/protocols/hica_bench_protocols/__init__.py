"""Evaluation protocols for hica-bench (a first-party plugin using only the public interfaces)."""

__version__ = "0.1.0"
