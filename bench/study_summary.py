"""What a `bam sweep` study cost and found, read from its Optuna storage: wall time, trial
minutes by state, the minutes pruning saved (each pruned trial against the mean complete
trial), and the best value found within the first B trial-minutes (B: ``--budget``, e.g. the
total of another study, to compare a search with a grid at the same cost). Trials a stopped
driver interrupted count in the total, not in the budget.

    python bench/study_summary.py NAME [NAME ...] [--root CHECKOUT ...] [--budget MINUTES]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import optuna

from bam_vae.sweep.study import interrupted, open_storage


def summary(root: Path, name: str, budget: float | None) -> dict[str, object]:
    study = optuna.load_study(study_name=name, storage=open_storage(None, root)[0])
    trials = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    minutes = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() / 60
               for t in trials}  # fmt: skip
    by_state: dict[str, list] = {}
    for t in trials:
        by_state.setdefault("INTERRUPTED" if interrupted(t) else t.state.name, []).append(t)
    complete = by_state.get("COMPLETE", [])
    full = statistics.mean(minutes[t.number] for t in complete) if complete else float("nan")
    pruned = by_state.get("PRUNED", [])
    saved = sum(full - minutes[t.number] for t in pruned)
    spent, best, best_trial = 0.0, float("inf"), None
    for t in sorted(trials, key=lambda t: t.datetime_complete):  # in the order they ended
        if interrupted(t):  # the driver was stopped: not the method's cost
            continue
        spent += minutes[t.number]
        if budget is not None and spent > budget:
            break
        if t.state.name == "COMPLETE" and t.value < best:
            best, best_trial = t.value, t
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return {
        "study": name,
        "wall min": round((end - start).total_seconds() / 60, 1),
        "trial min": round(sum(minutes.values()), 1),
        "trial min, not interrupted": round(
            sum(m for n, m in minutes.items() if not interrupted(study.trials[n])), 1
        ),
        **{f"{s.lower()}": len(v) for s, v in sorted(by_state.items())},
        "mean complete min": round(full, 2),
        "min saved by pruning": round(saved, 1),
        "best": round(best, 2),
        "best trial": best_trial.number if best_trial else None,
        "best params": best_trial.params if best_trial else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument(
        "--root",
        type=Path,
        nargs="+",
        default=[Path.cwd()],
        help="the checkout of each study (one for all, or one per name)",
    )
    parser.add_argument("--budget", type=float, help="trial-minutes counted, in end order")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    roots = args.root * len(args.names) if len(args.root) == 1 else args.root
    for name, root in zip(args.names, roots, strict=True):
        for key, value in summary(root, name, args.budget).items():
            print(f"{key:>22}: {value}")
        print()


if __name__ == "__main__":
    main()
