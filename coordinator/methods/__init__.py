"""Aggregation methods, one module each, and their registry (see docs/adding-a-method.md)."""
from .base import Method, MethodConfig, Served
from .registry import DEFAULT, METHODS, NAMES, make_method, method_class

__all__ = ["Method", "MethodConfig", "Served", "DEFAULT", "METHODS", "NAMES", "make_method", "method_class"]
