"""The command line: argument parsing only; every subcommand calls one API function."""

from .main import main

__all__ = ["main"]
