"""The plots of a run (written by `fit` into its folder) and of a sweep (beside results.md): each
figure draws the numbers it says it draws, from the curves read back from a run folder."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_fl import analysis, results
from lightning_fl.analysis import Overlay
from lightning_fl.cli import main
from lightning_fl.run_folder import (
    COMPARISON_PLOT,
    DICE_PLOT,
    FINAL_PLOT,
    FREQUENCY_PLOT,
    LOSS_PLOT,
    METRICS_COLUMNS,
    OVERLAY_PLOT,
    RunFolder,
)
from lightning_fl.sweep import collect_results
from lightning_fl.sweep_plan import load_sweep, plan_runs
from tests.helpers.images import assert_image
from tests.helpers.runs import SMOKE
from tests.helpers.sweeps import RESULTS, federated_rows, finish, write_sweep


def _lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_a_run_writes_its_plots_into_its_folder(smoke_run):
    for name in (DICE_PLOT, FINAL_PLOT, LOSS_PLOT, OVERLAY_PLOT):
        assert_image(smoke_run / name)


def test_the_dice_figure_draws_each_class_and_the_mean_over_the_rounds_numbered_from_one(smoke_run):
    rows = RunFolder(smoke_run).read_metrics()
    validation = [r for r in rows if r["phase"] == "validation"]
    rounds, dice = analysis.validation_dice(rows)
    assert rounds == [1, 2] and list(dice) == list(dict.fromkeys(r["class"] for r in validation))
    for cls, values in dice.items():
        expected = [
            np.mean([float(r["dice"]) for r in validation if (r["round"], r["class"]) == (str(i), cls)]) for i in rounds
        ]
        assert values == pytest.approx(expected, nan_ok=True)
    (ax,) = analysis.dice_over_rounds_figure(rows).axes
    drawn = _lines(ax)
    assert set(drawn) == set(dice) | {"mean"}
    for cls, values in dice.items():
        assert drawn[cls][0] == rounds and drawn[cls][1] == pytest.approx(list(values), nan_ok=True)
    assert drawn["mean"][1] == pytest.approx(list(np.nanmean(np.vstack(list(dice.values())), axis=0)))
    _, per_site = analysis.validation_dice(rows, per_site=True)
    assert set(per_site) == {f"{r['site']}/{r['class']}" for r in validation}


def test_the_final_bars_are_the_summarys_test_and_external_dice(smoke_run):
    summary = RunFolder(smoke_run).read_summary()
    (ax,) = analysis.final_dice_figure(summary).axes
    groups = {"test": summary["test_dice"]} | {f"external: {e}": d for e, d in summary["external_dice"].items()}
    classes = list(summary["test_dice"])
    heights = [bar.get_height() for bar in ax.patches]
    expected = [math.nan if d.get(c) is None else d[c] for d in groups.values() for c in classes]
    assert heights == pytest.approx(expected, nan_ok=True)
    assert ax.get_title() == f"Test and external Dice of the best global model (round {summary['best_round']})"


def test_the_losses_figure_draws_the_losses_the_method_has(smoke_run, tmp_path):
    rows = RunFolder(smoke_run).read_metrics()
    left, right = analysis.losses_figure(rows).axes
    train = [r for r in rows if r["phase"] == "train"]
    loss = [np.mean([float(r["loss"]) for r in train if r["round"] == str(i)]) for i in (1, 2)]
    assert _lines(left)["loss"] == ([1, 2], pytest.approx(loss))
    assert set(_lines(left)) == {"loss", "supervised", "condist"} and set(_lines(right)) == {"condist_weight", "lr"}

    without_condist = [  # a method without ConDist: neither its loss nor its weight appear
        {
            "round": r,
            "phase": "train",
            "site": s,
            "model": "local",
            "loss": 1.0 - 0.1 * r,
            "supervised": 1.0,
            "lr": 0.01,
        }
        for r in (1, 2, 3)
        for s in ("liver", "spleen")
    ]
    _write_metrics(tmp_path / "metrics.csv", without_condist)
    rounds, curves = analysis.training_curves(RunFolder(tmp_path).read_metrics())
    assert rounds == [1, 2, 3] and list(curves) == ["loss", "supervised", "lr"]
    assert curves["loss"] == pytest.approx([0.9, 0.8, 0.7])
    # neither validation rows nor a summary (a run cut off in its first rounds): only the losses
    assert analysis.write_run_plots(tmp_path) == [tmp_path / LOSS_PLOT]
    assert_image(tmp_path / LOSS_PLOT)


def test_the_losses_figure_reads_a_metrics_file_begun_before_a_loss_column_existed(tmp_path):
    """A run resumed by a newer version keeps its metrics.csv's header (the logger appends to it):
    a loss column added since (kd, pseudo_label) is absent, not an error."""
    older = tuple(c for c in METRICS_COLUMNS if c not in ("kd", "pseudo_label"))
    rows = [
        {"round": r, "phase": "train", "site": "liver", "model": "local", "loss": 1.0 / r, "condist": 0.5, "lr": 0.1}
        for r in (1, 2)
    ]
    _write_metrics(tmp_path / "metrics.csv", rows, older)
    rounds, curves = analysis.training_curves(RunFolder(tmp_path).read_metrics())
    assert rounds == [1, 2] and list(curves) == ["loss", "condist", "lr"]
    assert analysis.write_run_plots(tmp_path) == [tmp_path / LOSS_PLOT]


def test_the_overlays_show_each_sites_truth_and_prediction_in_one_colour_per_class(tmp_path):
    classes = ["background", "liver", "spleen"]
    image = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    truth = np.zeros((16, 16), dtype=np.uint8)
    truth[4:8, 4:8] = 1
    prediction = np.zeros_like(truth)
    prediction[8:12, 8:12] = 2
    overlays = {"liver": Overlay(image, truth, prediction), "spleen": Overlay(image, prediction, prediction)}
    fig = analysis.overlay_figure(overlays, classes, "title")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [
        "liver: ground truth",
        "spleen: ground truth",
        "liver: prediction",
        "spleen: prediction",
    ]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["liver", "spleen"]  # the classes shown, not background
    masks = [ax.get_images()[1] for ax in axes]  # above the grey slice
    assert all(m.get_clim() == (0, 2) for m in masks)  # one colour per class index, whatever a slice holds
    assert np.array_equal(masks[0].get_array(), truth) and np.array_equal(masks[2].get_array(), prediction)
    assert analysis.overlay_figure({}, classes, "title") is None
    assert analysis.write_run_plots(tmp_path, overlays, classes) == [tmp_path / OVERLAY_PLOT]
    assert_image(tmp_path / OVERLAY_PLOT)


def _write_metrics(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = METRICS_COLUMNS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_a_standalone_run_has_its_final_bars_and_validation_curves_of_every_site_model(tmp_path):
    validation = [
        {"round": r, "phase": "validation", "site": s, "model": s, "class": s, "dice": 0.2 * r}
        for r in (1, 2)
        for s in ("liver", "spleen")
    ]
    _write_metrics(tmp_path / "metrics.csv", validation)
    rounds, dice = analysis.validation_dice(RunFolder(tmp_path).read_metrics())
    assert rounds == [1, 2] and dice["spleen"] == pytest.approx([0.2, 0.4])
    summary = {
        "best_round": {"liver": 2, "spleen": 1},
        "test_dice": {"liver": 0.5, "spleen": None},
        "external_dice": {"ext": {"liver": 0.4, "spleen": math.nan}},
    }
    (ax,) = analysis.final_dice_figure(summary).axes
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.5, math.nan, 0.4, math.nan], nan_ok=True)
    assert ax.get_title() == "Test and external Dice of each site's own best model"
    assert analysis.final_dice_figure({}) is None and analysis.losses_figure(validation) is None


def _finished_sweep(folder: Path, variants: dict[str, list[str]]) -> Path:
    """A sweep of `variants` × seeds 0, 1 whose runs look finished (config.yaml, summary.json,
    test_cases.csv); variant i scores 0.05·i lower."""
    folder.mkdir(exist_ok=True)
    path = write_sweep(folder, SMOKE, seeds=[0, 1], variants=variants)
    for run in plan_runs(load_sweep(path)):
        finish(run, ("summary.json",))
        run.folder.write_cases(federated_rows(0.05 * list(variants).index(run.variant), run.seed))
    return path


def test_the_comparison_bars_are_the_test_table_and_the_frequency_points_each_methods_runs(tmp_path, capsys):
    variants = {
        "condistfl_1steps": ["fl.local_steps=1", "fl.rounds=4"],
        "condistfl_4steps": ["fl.local_steps=4", "fl.rounds=1"],
        "fedavg_4steps": ["method=fedavg", "fl.local_steps=4", "fl.rounds=1"],
    }
    path = _finished_sweep(tmp_path / "varied", variants)
    assert main(["sweep", str(path), "--tables-only"]) == 0
    out = tmp_path / "varied" / "out"
    assert f"{out / COMPARISON_PLOT}, {out / FREQUENCY_PLOT}" in capsys.readouterr().out
    assert_image(out / COMPARISON_PLOT)
    assert_image(out / FREQUENCY_PLOT)

    runs = plan_runs(load_sweep(path))
    by_run = results.per_run(collect_results(runs)[0])
    (ax,) = analysis.comparison_figure(list(variants), by_run).axes
    classes = ["liver", "liver_tumor", "spleen", "mean"]
    expected = [
        results.over_seeds(
            [results.run_mean(d) if c == "mean" else d[c] for (v, _), d in by_run.items() if v == variant]
        )[0]
        for variant in variants
        for c in classes
    ]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx(expected)

    points = results.frequency_points({run.variant: run.cfg for run in runs}, by_run)
    assert {m: {s: len(v) for s, v in by.items()} for m, by in points.items()} == {
        "condistfl": {1: 2, 4: 2},
        "fedavg_4steps": {4: 2},  # a method alone keeps its variant's name
    }
    assert points["condistfl"][1][0] == pytest.approx(np.mean([0.7, 0.5, 0.9]))  # seed 0: its classes' mean
    (ax,) = analysis.frequency_figure(points).axes
    drawn = {container.get_label(): container.lines[0] for container in ax.containers}  # error bars: data line
    assert list(drawn["condistfl"].get_xdata()) == [1, 4]
    assert list(drawn["condistfl"].get_ydata()) == pytest.approx([np.mean(points["condistfl"][s]) for s in (1, 4)])

    same = _finished_sweep(tmp_path / "same", {"a": [], "b": ["method=fedavg"]})
    assert main(["sweep", str(same), "--tables-only"]) == 0
    assert (tmp_path / "same" / "out" / COMPARISON_PLOT).is_file()
    assert not (tmp_path / "same" / "out" / FREQUENCY_PLOT).exists()  # every variant aggregates equally often


def test_the_cross_site_heatmap_is_the_cross_site_table(tmp_path):
    models, columns, matrix = results.cross_site(RESULTS, "solo")
    assert (models, columns) == (["liver", "spleen"], ["liver/liver", "spleen/spleen"])
    assert matrix == pytest.approx(np.array([[0.8, 0.0], [0.15, 0.9]]))  # results.md's cross-site table
    fig = analysis.cross_site_figure(models, columns, matrix, "solo")
    (image,) = fig.axes[0].get_images()
    assert np.array_equal(image.get_array().filled(np.nan), matrix)
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.80", "0.00", "0.15", "0.90"]


def test_the_sweep_curves_are_each_variants_validation_dice_mean_over_seeds(tmp_path):
    for variant, seed, shift in (("a", 0, 0.0), ("a", 1, 0.2), ("b", 0, 0.1)):
        (tmp_path / "runs" / variant / f"seed{seed}").mkdir(parents=True)
        rounds = (1, 2) if variant == "a" else (1, 2, 3)
        row = {"phase": "validation", "site": "liver", "model": "global", "class": "liver"}
        validation = [row | {"round": r, "dice": 0.3 * (r - 1) + shift} for r in rounds]
        _write_metrics(tmp_path / "runs" / variant / f"seed{seed}" / "metrics.csv", validation)
    (tmp_path / "runs" / "a" / "seed0.log").write_text("")  # a sweep's log beside the folders is no run
    curves = analysis.sweep_validation_dice(tmp_path)
    assert curves["a"][0] == [1, 2] and curves["a"][1]["liver"] == pytest.approx([0.1, 0.4])
    assert curves["b"][0] == [1, 2, 3] and curves["b"][1]["liver"] == pytest.approx([0.1, 0.4, 0.7])
    (ax,) = [ax for ax in analysis.sweep_dice_figure(curves).axes if ax.get_title() == "liver"]
    assert _lines(ax)["a"] == ([1, 2], pytest.approx([0.1, 0.4]))
    assert analysis.sweep_dice_figure({}) is None
