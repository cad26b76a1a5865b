"""Stopping a whole process group, ours or not (no torch, no MLflow: Ray workers import it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left (one we may not signal counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the whole group ``proc`` leads (started with ``start_new_session``), then
    SIGKILL to whatever is left after ``grace`` seconds. The group, not the leader: a server's
    workers (``mlflow models serve``'s uvicorn) outlive a leader that exits at once."""
    stop_pgid(proc.pid, grace, reap=proc.poll)
    proc.wait()


def stop_pgid(pgid: int, grace: float, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM to process group ``pgid``, then SIGKILL to whatever is left after ``grace``
    seconds. ``reap`` collects a leader that is this process's child, so that it does not
    count as alive; a group this process did not start needs none."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
