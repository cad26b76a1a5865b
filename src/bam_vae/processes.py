"""Stopping a child's whole process group (no torch, no MLflow: Ray workers import it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


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
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so it does not count as alive
        if not group_alive(proc.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
