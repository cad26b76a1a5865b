"""The guard of a trial's command: ``python guard.py WORK GRACE CMD [ARG...]``.

Runs CMD as its grandchild and exits with its status: the guard that watches CMD is the
child of an outer one, since Ray kills the direct children of a worker that exits
(``RAY_kill_child_processes_on_worker_exit``) and a guard killed with them could not stop
CMD. It is started as the leader of a process group of its own (``start_new_session``),
which CMD and all it starts inherit. If the outer guard dies (killed by Ray, or gone because
its Ray worker died: a node was lost) or, on the sweep driver's machine, the driver
(``BAM_SWEEP_DRIVER``: its pid; Ray notices a dead driver seconds later), the inner guard
stops the whole group: SIGTERM (``bam train`` marks its MLflow run KILLED), up to GRACE
seconds for the group's processes to exit, then it removes the folder WORK and SIGKILLs what
is left, itself included. So a dead trial never lives on beside its retry.

Only the standard library: :func:`bam_vae.sweep.trial.run_guarded` runs this file by its
path, so the guard is the code of the sweep, whatever ``PYTHONPATH`` its command gets (the
clone's ``src``). ``python -m bam_vae.sweep.guard`` works too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

POLL_S = 0.5  # how often the guard looks at its parent
DRIVER_ENV = "BAM_SWEEP_DRIVER"
INNER_ENV = "BAM_SWEEP_GUARD_INNER"


def members(group: int) -> list[int]:
    """The live processes of process group ``group`` (zombies do not count), but this one."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as file:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                state, _ppid, pgrp = file.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(pgrp) == group:
            found.append(int(pid))
    return found


def stop_and_exit(child: subprocess.Popen, work: str, grace: float) -> None:
    """SIGTERM this process group, wait up to ``grace`` seconds for it to exit, remove
    ``work``, then SIGKILL the group, this process included: it does not return."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while members(os.getpgrp()) and time.monotonic() < deadline:
        child.poll()  # reap it, so that it stops counting
        time.sleep(0.2)
    shutil.rmtree(work, ignore_errors=True)
    os.killpg(0, signal.SIGKILL)


def _watch(child: subprocess.Popen, gone: Callable[[], bool]) -> int | None:
    """Wait for ``child``; its exit status, or None as soon as ``gone()``."""
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if gone():
                return None


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python -m bam_vae.sweep.guard WORK GRACE CMD [ARG...]", file=sys.stderr)
        return 2
    work, grace, cmd = argv[0], float(argv[1]), argv[2:]
    parent, driver = os.getppid(), int(os.environ.get(DRIVER_ENV) or 0)
    env = dict(os.environ)
    if not env.pop(INNER_ENV, ""):
        # The outer guard, the Ray worker's child: Ray kills a worker's children when it exits,
        # which would leave the command orphaned. The inner guard, its child, watches it.
        inner = subprocess.Popen([sys.executable, "-P", __file__, *argv],
                                 env={**env, INNER_ENV: "1"})  # fmt: skip
        status = _watch(inner, lambda: os.getppid() != parent)
        return 1 if status is None else status  # no parent: the inner guard sees this exit
    child = subprocess.Popen(cmd, env=env)

    def gone() -> bool:
        return os.getppid() != parent or bool(driver and not os.path.exists(f"/proc/{driver}"))

    status = _watch(child, gone)
    if status is None:
        stop_and_exit(child, work, grace)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
