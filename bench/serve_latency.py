"""Serving a registered version: server start-up, and request latency for n = 16 and 1 024.

Starts ``bam serve`` (``mlflow models serve``) of the version in ``models/mlflow_run.json``
(or ``--model``), times until ``/ping`` answers, then times POST /invocations (median of
``--repeats``), each against the same prediction in-process (``mlflow.pyfunc.load_model``
then ``predict``) as the baseline: the ratio is what HTTP and JSON add.

    python bench/serve_latency.py [--model models:/bam-vae-cnn@champion] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd

from bam_vae.machine import cpu_name
from bam_vae.tracking import store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, n: int) -> float:
    body = json.dumps({"dataframe_records": [{"n": n, "seed": 0}]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        assert len(json.loads(reply.read())["predictions"]) == n
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="registered version (default: the pipeline's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    store.init()
    uri = (
        args.model
        or f"models:/{store.read_run_ref()['model_name']}/"
        + (store.read_run_ref()["model_version"])
    )
    port = free_port()
    bam = Path(sys.executable).with_name("bam")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(bam), "serve", "--model", uri, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("bam serve exited; run it by hand to see why") from None
                time.sleep(0.2)
        startup = time.perf_counter() - start
        import mlflow

        model = mlflow.pyfunc.load_model(uri)
        print(f"{cpu_name()}, {uri}: server start-up {startup:.1f} s (to /ping)")
        for n in (16, 1024):
            post(port, n)  # warm
            served = statistics.median(post(port, n) for _ in range(args.repeats))
            local = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.predict(pd.DataFrame({"n": [n], "seed": [0]}))
                local.append(time.perf_counter() - t)
            inproc = statistics.median(local)
            print(f"n = {n:>4}: HTTP {served * 1000:8.1f} ms, in-process predict"
                  f" {inproc * 1000:8.1f} ms ({served / inproc:.1f}x)")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
