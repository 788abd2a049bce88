"""Errors that mean "the input is wrong", not "the code is wrong": the command line prints their
message (which names the file, key or case) without a traceback and exits with status 2."""


class UserInputError(ValueError):
    """Base class of the project's input errors."""
