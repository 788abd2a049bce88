"""Errors the command line reports as a message, not a traceback: wrong input (it names the file,
key or case; exit status 2), and a run that cannot go on (exit status 1)."""


class UserInputError(ValueError):
    """Base class of the project's input errors."""


class DatalistError(UserInputError):
    """Data that cannot be read or lacks what a site needs; the message names the file or case."""


class RunStopped(RuntimeError):
    """The run cannot go on (too few sites sent a usable update); its last checkpoint is intact."""
