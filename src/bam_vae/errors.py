"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class BamError(Exception):
    """A user-facing error: bad params, a missing or corrupt file, an unknown model."""


class Interrupted(BamError):
    """A stage stopped on SIGINT/SIGTERM after leaving a checkpoint to resume from."""


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type if the message is empty)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
