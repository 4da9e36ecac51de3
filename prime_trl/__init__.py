"""prime-trl: PRIME on TRL."""
__version__ = "0.1.0"
