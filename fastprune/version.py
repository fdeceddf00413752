"""fastprune's version, declared once: the package, its caches and setup.py read it here."""

__version__ = "0.1.0"
