"""Errors the driver reports to dockerd (their text is what the user sees)."""


class DriverError(Exception):
    """A failure whose message is shown to the Docker user: say what and what to do."""


class UnsafeLayerError(DriverError):
    """A layer tar tried to create or touch something outside its layer directory."""


class NotFoundError(DriverError):
    """The layer named by the request does not exist."""
