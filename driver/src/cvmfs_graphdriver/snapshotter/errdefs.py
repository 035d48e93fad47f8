"""containerd's error classes (its `errdefs` package), which the gRPC service maps to codes.

A message reads as containerd's do: what went wrong, then the class
(`snapshot does not exist: not found`), so containerd's client (`errdefs.FromGRPC`)
strips the suffix and recognises the class from the gRPC code.
"""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base class: an error with a gRPC code (UNKNOWN unless a subclass says otherwise)."""

    code_name = "UNKNOWN"
    suffix = ""

    def __init__(self, message: str) -> None:
        if self.suffix and not message.endswith(": " + self.suffix):
            message = f"{message}: {self.suffix}"
        super().__init__(message)

    def wrap(self, prefix: str) -> SnapshotterError:
        """The same class with context in front (Go's fmt.Errorf("prefix: %w", err))."""
        err = type(self).__new__(type(self))
        Exception.__init__(err, f"{prefix}: {self}")
        return err


class NotFound(SnapshotterError):
    code_name = "NOT_FOUND"
    suffix = "not found"


class AlreadyExists(SnapshotterError):
    code_name = "ALREADY_EXISTS"
    suffix = "already exists"


class FailedPrecondition(SnapshotterError):
    code_name = "FAILED_PRECONDITION"
    suffix = "failed precondition"


class InvalidArgument(SnapshotterError):
    code_name = "INVALID_ARGUMENT"
    suffix = "invalid argument"


class Unavailable(SnapshotterError):
    code_name = "UNAVAILABLE"
    suffix = "unavailable"


class ResourceExhausted(SnapshotterError):
    """Out of a resource, the disk above all (containerd's errdefs.ErrResourceExhausted;
    a containerd whose errdefs lack it reads the code as Unknown, keeping the message)."""

    code_name = "RESOURCE_EXHAUSTED"
    suffix = "resource exhausted"


class NotImplemented_(SnapshotterError):  # noqa: N801 (the builtin name is taken)
    code_name = "UNIMPLEMENTED"
    suffix = "not implemented"
