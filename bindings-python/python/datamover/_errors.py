"""The exception hierarchy of datamover.

Every error raised by the library is a ``DataMoverError`` (or, for a file or
device that does not exist, the built-in ``FileNotFoundError``). Messages are
the same one-line texts the ``dm`` command prints: what went wrong and what
to do.
"""


class DataMoverError(Exception):
    """Base class of every datamover error."""


class CorruptRepositoryError(DataMoverError):
    """Repository data is damaged or missing (a pack, index or manifest).

    Run ``Repository.verify(read_data=True)`` to see which points are affected.
    """


class TransportError(DataMoverError, OSError):
    """Reading the source or writing the target or repository failed
    (I/O error, no space left, later: NBD protocol failures)."""


class UnsupportedError(DataMoverError):
    """The operation, address scheme or format version is not supported by
    this build."""


class InvalidInputError(DataMoverError, ValueError):
    """An argument is wrong: a bad name, size, option, an existing target, a
    path that is not a repository, a point that does not exist."""


class CancelledError(DataMoverError):
    """The run was cancelled; no partial restore point was left."""


__all__ = [
    "DataMoverError",
    "CorruptRepositoryError",
    "TransportError",
    "UnsupportedError",
    "InvalidInputError",
    "CancelledError",
]
