"""The command line: argument parsing only; every subcommand calls one API function."""

from gpt2load.cli.main import main

__all__ = ["main"]
