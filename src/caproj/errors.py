"""One exception type for every user-facing error: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class CaprojError(Exception):
    """A clear, one-line problem with the user's input or environment.

    `param` names the library parameter at fault (e.g. "target_macs"), so a front end can
    point at its own spelling of it (the CLI names its flag)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
