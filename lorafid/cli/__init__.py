"""The command line: ``lorafid audit | behave | extract | probe | batch | open``."""

from lorafid.cli.commands import main

__all__ = ["main"]
