"""One exception family for everything convt3d refuses.

Every error is a ``ValueError`` so that library users can catch the usual
type, and carries ``exit_code`` so the command line can map it without a
lookup table: 2 for a usage problem (bad option values), 1 for a data or
file problem.
"""


class Convt3dError(ValueError):
    """Base class of all convt3d errors."""

    exit_code = 1


class ParameterError(Convt3dError):
    """An invalid layer parameter (stride, padding, groups, ...).

    Parameters
    ----------
    param : str
        Name of the offending parameter, e.g. ``"output_padding"``.
    message : str
        Human-readable explanation; should mention ``param``.
    """

    exit_code = 2

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


class ShapeError(Convt3dError):
    """Input, weight or bias shapes that do not fit together."""


class FileFormatError(Convt3dError):
    """A file that cannot be read: unsupported, corrupt, truncated or ambiguous."""


class KeyNotFoundError(FileFormatError):
    """``PATH:KEY`` names an array or dataset the file does not hold."""


class OutputError(Convt3dError):
    """The output cannot be written (exists, is the input, folder missing, ...)."""


class MemoryLimitError(Convt3dError):
    """The data would not fit in the memory convt3d is allowed to use."""


class CollisionError(OutputError):
    """Two inputs of a batch would be written to one output, or an output would replace an input."""


class DistributedUnavailable(Convt3dError):
    """A Dask scheduler was asked for but Dask's ``distributed`` cannot be imported.

    Exit code 2: like a bad option, it is refused before any work and fixed by
    changing the installation or the command, not the data.
    """

    exit_code = 2


class MissingDependency(Convt3dError):
    """An optional package a file needs is not installed (``onnx`` for ``.onnx`` models).

    Exit code 2, like :class:`DistributedUnavailable`: the message says what to install.
    """

    exit_code = 2


class SchedulerError(Convt3dError):
    """The Dask scheduler cannot be reached."""
