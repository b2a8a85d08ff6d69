"""The CLI commands, one module per stage; each only parses flags, calls the stage, renders."""
