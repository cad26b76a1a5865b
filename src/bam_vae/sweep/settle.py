"""The end of a sweep: its table, the trials' logs, its MLflow runs settled and its parent
run closed (:func:`finish`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def short_node(node_id: str) -> str:
    return node_id[:8] if node_id else "-"


def table(results: list[dict[str, Any]]) -> str:
    """The final table: one line per grid point."""
    rows = [("#", "experiment", "point", "status", "node", "time", "FID")]
    for r in sorted(results, key=lambda r: r["index"]):
        node = f"{short_node(r.get('node_id', ''))} ({r['host']})" if r.get("host") else "-"
        secs, fid = r.get("seconds"), r.get("fid")
        rows.append((
            str(r["index"]), r["exp_name"], r["point"], r["status"], node,
            f"{secs:.0f} s" if secs is not None else "-",
            f"{fid:.1f}" if isinstance(fid, int | float) else "-",
        ))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def settle(client: Any, experiment_id: str, parent: str, sweep: str, results: list[dict]) -> None:
    """Exactly one FINISHED run and one registered version per finished grid point.

    A trial whose node died may have left a run behind: RUNNING (its processes were killed
    before they could mark it), KILLED (its guard stopped it) or even FINISHED, with a
    registered version if it got that far, while its retry logged another run. The point's
    run is the one its successful attempt reported; the other runs of that point are marked
    KILLED (unless FAILED or KILLED already) and their versions deleted. Runs of a cancelled
    point (Ctrl-C) are marked KILLED, keeping their versions; a run still RUNNING once every
    trial has returned has no process left: KILLED too."""
    winners = {r["run_id"] for r in results if r["status"] == "done" and r["run_id"]}
    by_exp = {r["exp_name"]: r for r in results}
    for run in client.search_runs([experiment_id], f"tags.sweep = '{sweep}'"):
        tags, run_id, status = run.data.tags, run.info.run_id, run.info.status
        if tags.get("mlflow.parentRunId") != parent or run_id in winners:
            continue
        point = by_exp.get(tags.get("dvc_exp_name", ""), {})
        superseded = point.get("status") == "done"
        if superseded:
            why = f"superseded by run {point['run_id']}"
        elif point.get("status") == "cancelled":
            why = "its trial was cancelled"
        else:
            why = "its trial is gone"
        if status == "RUNNING" or (status == "FINISHED" and why != "its trial is gone"):
            client.set_terminated(run_id, status="KILLED")
            client.set_tag(run_id, "bam_sweep_settled", why)
            print(f"sweep: run {run_id} ({status}) marked KILLED: {why}", flush=True)
        if superseded:
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                client.delete_model_version(version.name, version.version)
                client.set_tag(run_id, "bam_sweep_settled", why)
                print(f"sweep: deleted {version.name} version {version.version} of run {run_id}"
                      f" ({why})", flush=True)  # fmt: skip


def finish(client: Any, experiment_id: str, parent: str, results: list[dict], status: str,
           root: Path, sweep: str) -> Path:  # fmt: skip
    """Keep every trial's log, settle duplicates, record the table, close the parent run;
    returns the folder of the logs."""
    logs = root / ".cache" / "sweeps" / sweep
    logs.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r.get("log"):
            (logs / f"{r['exp_name']}.log").write_text(r["log"])
    try:
        settle(client, experiment_id, parent, sweep, results)
        slim = [{k: v for k, v in r.items() if k != "log"} for r in results]
        client.log_text(parent, table(results) + "\n", "sweep/table.txt")
        client.log_text(parent, json.dumps(slim, indent=2, default=str), "sweep/results.json")
        client.log_metric(parent, "points_done", sum(r["status"] == "done" for r in results))
        client.log_metric(parent, "points_failed", sum(r["status"] != "done" for r in results))
    finally:
        client.set_terminated(parent, status=status)
    return logs
