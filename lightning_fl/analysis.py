"""The plots of a run and of a sweep, and the curves they draw, from what the run folders hold.

`fit` writes a run's plots into its folder when it ends, `sweep` its comparison beside results.md,
and notebooks plot runs with the same functions (the numbers come from `results.py`; the files are
read through `run_folder.py`). numpy only (pandas is a dev dependency); figures are
`matplotlib.figure.Figure`s drawn on the Agg canvas, never through pyplot, so nothing here changes
the backend of a notebook or other caller.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from lightning_fl.checkpoint import atomic_write_bytes
from lightning_fl.results import over_seeds, run_mean
from lightning_fl.run_folder import (
    DICE_PLOT,
    FINAL_PLOT,
    LOSS_PLOT,
    OVERLAY_PLOT,
    TRAIN,
    VALIDATION,
    RunFolder,
    SweepFolder,
)

if TYPE_CHECKING:
    import torch

LOSSES = ("loss", "supervised", "condist", "kd", "pseudo_label", "proximal")  # training losses, metrics.csv's order
SCHEDULES = ("condist_weight", "lr")  # per-round values the losses are weighted or stepped with
SCHEDULE_NAMES = {"condist_weight": "teacher-term weight", "lr": "learning rate"}


@dataclass
class Overlay:
    """One axial slice of a case, its ground truth and the model's prediction: overlays.png, W&B's masks."""

    image: np.ndarray  # uint8 grey levels
    truth: np.ndarray  # class indices
    prediction: np.ndarray

    @staticmethod
    def of(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> Overlay:
        """The slice (last spatial axis: axial) with the most ground-truth foreground of a batch's
        first volume `[B, C, H, W, D]`, transposed so that rows run anterior–posterior."""
        import torch  # the plots of a sweep and the notebooks need no torch

        truth = label[0, 0]
        z = int((truth > 0).sum((0, 1)).argmax())
        grey = image[0, 0, :, :, z].float()
        grey = (grey - grey.min()) / (grey.max() - grey.min()).clamp_min(1e-8) * 255
        return Overlay(*(t.T.to(torch.uint8).cpu().numpy() for t in (grey, truth[:, :, z], pred[0, 0, :, :, z])))


Curves = tuple[list[int], dict[str, np.ndarray]]  # rounds, and name → one value per round (NaN: none)


def download_wandb_runs(path: str, to: Path | str, group: str | None = None, api: Any = None) -> list[Path]:
    """The run folders' record files of the W&B runs of project `path` ("entity/project"), of one
    `group` (a sweep) if given, downloaded to `to/<run id>/` (each a `RunFolder`): a notebook's way to
    read runs made on other machines. Needs network and a W&B login (`api`: a `wandb.Api()`; offline
    runs are there once `wandb sync` has uploaded them)."""
    if api is None:
        import wandb

        api = wandb.Api()
    folders = []
    for run in api.runs(path, filters={"group": group} if group else None):
        folder = Path(to) / run.id
        for file in run.files(names=list(RunFolder.RECORD)):  # those it has: a run cut off has no summary
            file.download(root=str(folder), replace=True, exist_ok=True)
        folders.append(folder)
    return folders


def _number(cell: str) -> float:
    return float(cell) if cell else math.nan


def _curves(rows: list[dict[str, str]], name_of: Any, value_of: Any) -> Curves:
    """Per name and round, the mean over the rows of that round (the sites); NaN where none has a value."""
    rounds = sorted({int(r["round"]) for r in rows})
    at = {r: i for i, r in enumerate(rounds)}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for row in rows:
        for name, value in value_of(row):
            if not math.isnan(value):
                key = name_of(row, name)
                sums.setdefault(key, np.zeros(len(rounds)))[at[int(row["round"])]] += value
                counts.setdefault(key, np.zeros(len(rounds)))[at[int(row["round"])]] += 1
    with np.errstate(invalid="ignore"):
        return rounds, {key: sums[key] / counts[key] for key in sums}


def validation_dice(rows: list[dict[str, str]], per_site: bool = False) -> Curves:
    """Each class's validation Dice per validated round: the mean over the sites that label it (and
    over the models that score it: a standalone run's site models), or per `site/class`."""
    rows = [r for r in rows if r["phase"] == VALIDATION]
    return _curves(
        rows,
        lambda r, name: f"{r['site']}/{name}" if per_site else name,
        lambda r: [(r["class"], _number(r["dice"]))],
    )


def training_curves(rows: list[dict[str, str]]) -> Curves:
    """The mean over sites of each training loss and schedule the train rows have: a method without
    ConDist or FedProx has no condist, condist_weight or proximal column values, and none appear; a
    metrics.csv begun by an older version (resumed runs keep its header) lacks later loss columns."""
    rows = [r for r in rows if r["phase"] == TRAIN]
    return _curves(rows, lambda r, name: name, lambda r: [(c, _number(r.get(c, ""))) for c in LOSSES + SCHEDULES])


def png_bytes(fig: Figure) -> bytes:
    """The figure drawn by Agg as PNG bytes (no pyplot, so no backend is touched)."""
    out = io.BytesIO()
    FigureCanvasAgg(fig).print_png(out)
    return out.getvalue()


def write_png(path: Path, fig: Figure | bytes) -> Path:
    """The figure (or its PNG bytes) into a PNG at `path`, written atomically (a reader never sees half of it)."""
    png = fig if isinstance(fig, bytes) else png_bytes(fig)
    atomic_write_bytes(path, lambda f: f.write(png))
    return path


def show(fig: Figure, name: str, folder: Path | str | None = None) -> Any:
    """A notebook's figure: an `IPython.display.Image` of it (the notebook shows it whatever its
    backend), also written to `folder/name` when a folder is given (what CI checks)."""
    from IPython.display import Image  # a notebook's dependency, not the package's

    png = png_bytes(fig)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_png(Path(folder) / name, png)
    return Image(png)


def _lines(ax: Any, rounds: list[int], curves: Mapping[str, np.ndarray]) -> None:
    for name, values in curves.items():
        ax.plot(rounds, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def dice_over_rounds_figure(rows: list[dict[str, str]]) -> Figure | None:
    """Validation Dice per class over rounds, and their mean (what selects the best round)."""
    rounds, dice = validation_dice(rows)
    if not dice:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    _lines(ax, rounds, dice)
    stack = np.vstack(list(dice.values()))
    counts = (~np.isnan(stack)).sum(axis=0)
    mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)  # NaN, no warning
    ax.plot(rounds, mean, color="black", linewidth=2.5, label="mean")
    ax.set(ylabel="validation Dice", ylim=(0, 1), title="Validation Dice per class (mean over the sites labelling it)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def final_dice_figure(summary: Mapping[str, Any]) -> Figure | None:
    """Test Dice per class and each external site's per organ, of the best model(s): grouped bars."""
    test = summary.get("test_dice") or {}
    if not test:
        return None
    groups = {"test": test} | {f"external: {site}": organs for site, organs in summary.get("external_dice", {}).items()}
    classes = list(test)
    fig = Figure(figsize=(max(6, 1.1 * len(classes) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for i, (name, dice) in enumerate(groups.items()):
        values = [math.nan if dice.get(c) is None else dice[c] for c in classes]
        ax.bar(np.arange(len(classes)) + (i - (len(groups) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    best = summary.get("best_round")
    which = f"the best global model (round {best})" if isinstance(best, int) else "each site's own best model"
    ax.set(ylabel="Dice", ylim=(0, 1), title=f"Test and external Dice of {which}")
    ax.legend(fontsize=7)
    return fig


def losses_figure(rows: list[dict[str, str]]) -> Figure | None:
    """The training losses (mean over sites) and, beside them, the ConDist weight and learning rate."""
    rounds, curves = training_curves(rows)
    losses = {k: v for k, v in curves.items() if k in LOSSES}
    if not losses:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    _lines(left, rounds, losses)
    left.set(ylabel="mean over sites", title="Training losses")
    left.legend(fontsize=7)
    schedules = {k: v for k, v in curves.items() if k in SCHEDULES}
    _lines(right, rounds, schedules)
    right.set(yscale="log", title=" and ".join(SCHEDULE_NAMES[k] for k in schedules))
    right.legend(fontsize=7)
    return fig


def overlay_figure(overlays: Mapping[str, Overlay], classes: Sequence[str], title: str) -> Figure | None:
    """Per site, its slice with the ground truth and, beside it, with the prediction, in one colour
    per class (background clear) and a legend of the classes shown."""
    if not overlays:
        return None
    colours = matplotlib.colormaps["tab10"].resampled(max(len(classes) - 1, 1))
    cmap = ListedColormap([(0, 0, 0, 0)] + [colours(i) for i in range(len(classes) - 1)])
    fig = Figure(figsize=(2.4 * len(overlays), 5.4), layout="constrained")
    axes = fig.subplots(2, len(overlays), squeeze=False)
    shown: set[int] = set()
    for column, (site, overlay) in enumerate(overlays.items()):
        for row, (name, mask) in enumerate((("ground truth", overlay.truth), ("prediction", overlay.prediction))):
            ax = axes[row, column]
            ax.imshow(overlay.image, cmap="gray", interpolation="nearest")
            ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(classes) - 1, alpha=0.55, interpolation="nearest")
            ax.set_title(f"{site}: {name}", fontsize=9)
            ax.set_axis_off()
            shown |= {int(c) for c in np.unique(mask) if c > 0}
    handles = [Patch(color=cmap(c), label=classes[c]) for c in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def write_run_plots(
    folder: Path | str,
    overlays: Mapping[str, Overlay] | None = None,
    classes: Sequence[str] = (),
    summary: Mapping[str, Any] | None = None,
) -> list[Path]:
    """The run's plots, as PNGs in its folder (those its files allow, and the last validated
    round's `overlays` when given); the paths written. `summary`: the run's, before summary.json
    is written (read from the folder otherwise)."""
    run = RunFolder(folder)
    metrics = run.read_metrics()
    figures = {
        DICE_PLOT: dice_over_rounds_figure(metrics),
        FINAL_PLOT: final_dice_figure(summary if summary is not None else run.read_summary()),
        LOSS_PLOT: losses_figure(metrics),
        OVERLAY_PLOT: overlay_figure(
            overlays or {}, classes, "The last round's model on each site's first validation case (axial slice)"
        ),
    }
    return [write_png(run.plot(name), fig) for name, fig in figures.items() if fig is not None]


# ---------------------------------------------------------------- sweeps
def comparison_figure(variants: Sequence[str], per_run: Mapping[tuple[str, int], Mapping[str, float]]) -> Figure:
    """Per class and their mean, each variant's test Dice as mean ± std over seeds: grouped bars."""
    classes = list(dict.fromkeys(c for dice in per_run.values() for c in dice)) + ["mean"]
    fig = Figure(figsize=(min(14, max(6, 0.3 * len(classes) * len(variants) + 2)), 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        runs = [dice for (v, _), dice in per_run.items() if v == variant]
        stats = [over_seeds([run_mean(d) if c == "mean" else d.get(c, math.nan) for d in runs]) for c in classes]
        x = np.arange(len(classes)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=variant)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set(ylabel="test Dice (mean ± std over seeds)", ylim=(0, 1), title="Test Dice per class")
    fig.legend(loc="outside lower center", fontsize=8, ncol=min(6, len(variants)))  # clear of the bars
    return fig


def frequency_figure(points: Mapping[str, Mapping[int, Sequence[float]]]) -> Figure:
    """Test mean Dice (mean ± std over seeds) against local steps per round, one line per method:
    `points` = method → local steps → each seed's test mean Dice."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method, by_steps in points.items():
        steps = sorted(by_steps)
        stats = [over_seeds(by_steps[s]) for s in steps]
        ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=method)
    ticks = sorted({s for by_steps in points.values() for s in by_steps})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(s) for s in ticks])
    ax.minorticks_off()
    ax.set(xlabel="local steps per round", ylabel="test mean Dice (mean ± std over seeds)", ylim=(0, 1))
    ax.set_title("Aggregation frequency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def dice_by_size_figure(points: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]) -> Figure:
    """One panel per class: each test case's Dice against the class's volume in that case (ml, log
    scale), one colour per variant, every seed's point: whether a low mean Dice is the method's or
    the small structures'. `points` = class → variant → (volume ml, Dice) pairs."""
    fig = Figure(figsize=(4 * len(points), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(points), sharey=True, squeeze=False)).ravel()
    for ax, (cls, by_variant) in zip(axes, points.items()):
        for variant, pairs in by_variant.items():
            ax.scatter(*zip(*pairs), s=14, alpha=0.6, label=variant)
        ax.set_xscale("log")
        ax.set(title=cls, xlabel="volume in the case (ml)", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice of the case")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=min(6, len(labels)))
    return fig


def sweep_validation_dice(folder: Path | str) -> dict[str, Curves]:
    """Per variant, each class's validation Dice over rounds (as `validation_dice`), mean over its seeds."""
    by_variant: dict[str, list[Curves]] = {}
    for (variant, _), run in SweepFolder(folder).runs().items():
        by_variant.setdefault(variant, []).append(validation_dice(run.read_metrics()))
    out: dict[str, Curves] = {}
    for variant, curves in by_variant.items():
        rounds = sorted({r for rs, _ in curves for r in rs})
        stacks: dict[str, list[np.ndarray]] = {}
        for rs, dice in curves:
            at = [rounds.index(r) for r in rs]
            for cls, values in dice.items():
                row = np.full(len(rounds), np.nan)
                row[at] = values
                stacks.setdefault(cls, []).append(row)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a round no seed validated stays NaN
            out[variant] = rounds, {cls: np.nanmean(np.vstack(rows), axis=0) for cls, rows in stacks.items()}
    return out


def sweep_dice_figure(curves: Mapping[str, Curves]) -> Figure | None:
    """One panel per class: each variant's validation Dice over rounds (mean over seeds)."""
    classes = list(dict.fromkeys(c for _, dice in curves.values() for c in dice))
    if not classes:
        return None
    columns = min(4, len(classes))
    rows = math.ceil(len(classes) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for ax, cls in zip(axes, classes):
        for variant, (rounds, dice) in curves.items():
            if cls in dice:
                ax.plot(rounds, dice[cls], marker="o", markersize=3, label=variant)
        ax.set(title=cls, xlabel="round", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(classes) :]:
        ax.set_axis_off()
    axes[0].set_ylabel("validation Dice")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=min(6, len(curves)))
    fig.suptitle("Validation Dice per class over rounds (mean over seeds)")
    return fig


def cross_site_figure(models: Sequence[str], columns: Sequence[str], matrix: np.ndarray, title: str) -> Figure:
    """A cross-site matrix (models × `site/class`) as a heatmap with its values written in (blank:
    not scored): a sweep's standalone variant, or `evaluate --cross-site`."""
    fig = Figure(figsize=(max(5, 0.9 * len(columns) + 2), max(3, 0.6 * len(models) + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            color = "white" if value < 0.5 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set(xlabel="test split / class", ylabel="model", title=title)
    fig.colorbar(image, ax=ax, label="Dice")
    return fig
