"""`sieve capture` (not implemented yet)."""

from .stubs import not_implemented

capture = not_implemented("capture")
