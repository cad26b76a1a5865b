"""The report's figures: each a pure function of the table (and the loss histories) that
writes one PNG and returns None, or returns why the runs cannot support it (nothing written).

The numbered ones redraw the BAM! report's figures from whatever runs are selected: Figure 2
(loss per epoch), Figure 5 (final losses vs latent size), Figure 6a/6b (FID vs latent size /
vs the share k1 / (k1 + k2)); precision against recall is Kynkäänniemi et al. 2019's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bam_vae.figures import colormap, save_figure, subplots
from bam_vae.reporting.table import SPACES

# The params a sweep can vary, in the order used to group the loss curves of Figure 2.
SWEPT = ["train_fraction", "epochs", "z_dim", "k1", "arch"]


def _fid_spaces(table: pd.DataFrame) -> list[str]:
    return [s for s in SPACES if table[f"fid_{s}"].notna().any()]


def fid_vs(table: pd.DataFrame, x: str, path: Path, title: str, logx: bool) -> str | None:
    """Figure 6a (``x`` = z_dim, log-x) or 6b (``x`` = k1_share): FID per dataset, arch and
    sampler, log-y, one panel per feature space, each dataset's floor dashed."""
    spaces = _fid_spaces(table)
    if not spaces or table[x].nunique() < 2:
        return f"needs runs with FID and at least two values of {x} (have {table[x].nunique()})"
    fig, axes = subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        scored = table.dropna(subset=[f"fid_{space}"])
        several = scored["dataset"].nunique() > 1
        for (dataset, arch, sampler), group in scored.groupby(["dataset", "arch", "sampler"]):
            g = group.groupby(x)[[f"fid_{space}", f"fid_floor_{space}"]].mean().sort_index()
            name = f"{dataset} {arch}" if several else arch
            ax.plot(g.index, g[f"fid_{space}"], marker="o", label=f"{name}, {sampler}")
        for dataset, group in table.groupby("dataset"):  # each dataset has its own floor
            floor = group[f"fid_floor_{space}"].mean()
            if not np.isnan(floor):
                what = f"{dataset} floor" if several else "floor"
                ax.axhline(floor, color="grey", ls="--", label=f"{what} (real vs real)")
        ax.set(xlabel=x, ylabel=f"FID ({space} features)", title=title, yscale="log")
        if logx:
            ax.set_xscale("log", base=2)
        ax.legend()
    save_figure(fig, path)
    return None


def precision_recall(table: pd.DataFrame, path: Path) -> str | None:
    """Precision against recall (Kynkäänniemi et al. 2019), one point per run and sampler,
    one panel per feature space: up and right is better; the corner is the test set's."""
    spaces = [s for s in SPACES if table[f"precision_{s}"].notna().any()]
    if not spaces:
        return "needs runs scored by compute-fid with precision/recall (run it again)"
    fig, axes = subplots(1, len(spaces), figsize=(5 * len(spaces), 4.5), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        scored = table.dropna(subset=[f"precision_{space}"])
        for (arch, sampler), g in scored.groupby(["arch", "sampler"], dropna=False):
            ax.scatter(g[f"recall_{space}"], g[f"precision_{space}"], label=f"{arch} {sampler}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall (test images covered)",
               ylabel="precision (samples on the test manifold)", title=space)  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle("Improved precision and recall, k = 3")
    save_figure(fig, path)
    return None


def loss_vs_zdim(table: pd.DataFrame, path: Path) -> str | None:
    """Figure 5: the final train and test loss against the latent size, per dataset and arch."""
    if table["z_dim"].nunique() < 2 or table["test_loss"].isna().all():
        return (
            f"needs finished runs with at least two z_dim values (have {table['z_dim'].nunique()})"
        )
    fig, ax = subplots(figsize=(6, 4))
    runs = table.drop_duplicates("run_id")
    several = runs["dataset"].nunique() > 1
    for (dataset, arch), group in runs.groupby(["dataset", "arch"]):
        g = group.groupby("z_dim")[["train_loss", "test_loss"]].mean().sort_index()
        name = f"{dataset} {arch}" if several else arch
        ax.plot(g.index, g["train_loss"], marker="o", label=f"{name} train")
        ax.plot(g.index, g["test_loss"], marker="s", ls="--", label=f"{name} test")
    ax.set(
        xlabel="z_dim", ylabel="final loss", title="Final train/test loss vs latent size (Fig. 5)"
    )
    ax.set_xscale("log", base=2)
    ax.legend()
    save_figure(fig, path)
    return None


def loss_curves(table: pd.DataFrame, history: pd.DataFrame, path: Path) -> str | None:
    """Figure 2: train and test loss per epoch, one curve per run, coloured by the first
    param of ``SWEPT`` that varies (``history``: :func:`~bam_vae.reporting.table.histories`)."""
    if table.empty:
        return "no runs selected"
    varying = [p for p in SWEPT if table[p].nunique() > 1]
    group = varying[0] if varying else "arch"
    table = table.drop_duplicates("run_id")  # a row per sampler; one curve per run
    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = colormap("viridis")
    values = sorted(table[group].dropna().unique())
    curves = dict(tuple(history.sort_values("step").groupby(["run_id", "metric"])))
    for _, row in table.iterrows():
        # A run without the param (a trial that failed before logging it) is drawn grey.
        value = row[group]
        shade = (
            colours(values.index(value) / max(1, len(values) - 1)) if pd.notna(value) else "grey"
        )
        for ax, metric in zip(axes, ("train_loss", "test_loss"), strict=True):
            curve = curves.get((row["run_id"], metric))
            if curve is not None:
                ax.plot(curve["step"], curve["value"], color=shade, label=f"{group}={row[group]}")
    for ax, metric in zip(axes, ("train loss", "test loss"), strict=True):
        ax.set(xlabel="epoch", title=f"{metric} per epoch, by {group} (Fig. 2)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    save_figure(fig, path)
    return None
