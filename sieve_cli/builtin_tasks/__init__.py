"""Built-in tasks: YAML task files that need no data, and the generators of their records."""
