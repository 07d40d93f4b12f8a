"""guichet: an appointment-booking engine for public services under bot attack."""

__version__ = "0.1.0"
