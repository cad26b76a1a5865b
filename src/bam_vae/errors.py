"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class BamError(Exception):
    """A user-facing error: bad params, a missing or corrupt file, an unknown model."""


class Interrupted(BamError):
    """A stage stopped on SIGINT/SIGTERM after leaving a checkpoint to resume from."""
