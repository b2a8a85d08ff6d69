"""`sieve search` (not implemented yet)."""

from .stubs import not_implemented

search = not_implemented("search")
