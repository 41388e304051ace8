"""The one exception type users see: a message meant for people, printed by the CLI as one line."""


class Gpt2LoadError(Exception):
    """A user-facing failure: what failed, which file or tensor, and what to do next."""
