"""charlm: character-level recurrent language models from the command line."""

__version__ = "0.1.0"


class CharlmError(Exception):
    """A problem the user can act on. The CLI prints its message as one line and exits 1."""
