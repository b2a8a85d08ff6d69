"""`sieve eval` (not implemented yet)."""

from .stubs import not_implemented

eval = not_implemented("eval")
