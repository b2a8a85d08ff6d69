"""`sieve apply` (not implemented yet)."""

from .stubs import not_implemented

apply = not_implemented("apply")
