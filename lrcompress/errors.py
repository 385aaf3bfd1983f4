"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class LrcompressError(Exception):
    """Base class: anything the user can fix (bad input, missing file, numerical failure)."""


class RecipeError(LrcompressError):
    """A recipe that does not validate; the message names the file and the key."""


class NumericalError(LrcompressError):
    """NaN/Inf or an unrecoverable decomposition failure; the message names the module."""


class CheckpointError(LrcompressError):
    """A checkpoint directory that is missing, incomplete or of an unknown format."""


class OutOfMemory(LrcompressError):
    """The compute (or host) device ran out of memory; the message names where and the knobs that help."""
