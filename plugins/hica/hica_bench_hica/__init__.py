"""HiCA (hierarchical contrastive alignment) as a hica-bench plugin, built on the public interfaces only."""

__version__ = "0.1.0"
