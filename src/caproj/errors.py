"""One exception type for every user-facing error: the CLI prints it as one line and exits 2."""


class CaprojError(Exception):
    """A clear, one-line problem with the user's input or environment."""
