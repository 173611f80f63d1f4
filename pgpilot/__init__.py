"""pgpilot: a self-optimizing PostgreSQL proxy."""
__version__ = "0.1.0"
