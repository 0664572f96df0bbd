"""``ferry ...``: the command line, one module per command group."""

from ferry.cli.main import main

__all__ = ["main"]
