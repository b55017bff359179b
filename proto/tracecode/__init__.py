"""tracecode: drug traceability-code verification at settlement."""
__version__ = "0.1.0"
