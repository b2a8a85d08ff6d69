"""`sieve fit` (not implemented yet)."""

from .stubs import not_implemented

fit = not_implemented("fit")
