"""The plots of a run (written by `fit` into its folder) and of a sweep (beside results.md), and the
loaders they and notebooks read a run folder with."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from matplotlib.image import imread
from test_sweep import RESULTS, _finish, _rows, _write_cases, _write_sweep

from lightning_fl import analysis
from lightning_fl.cli import main
from lightning_fl.loggers import CSV_COLUMNS, Overlay
from lightning_fl.sweep import (
    _class_means,
    collect_results,
    headline_rows,
    load_sweep,
    plan_runs,
    results_csv,
    results_markdown,
)

SMOKE = REPO / "configs" / "smoke.yaml"


def _assert_image(path: Path) -> None:
    """A PNG that reads back, with pixels, not one flat colour."""
    assert path.is_file() and path.stat().st_size > 0, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, path
    assert (image != image[0, 0]).any(), f"{path} is one colour"


def _metrics(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(newline="")))


def test_a_run_writes_its_plots_into_its_folder(smoke_run):
    for name in (analysis.DICE_PLOT, analysis.FINAL_PLOT, analysis.LOSS_PLOT, analysis.OVERLAY_PLOT):
        _assert_image(smoke_run / name)


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
    assert analysis.overlay_figure({}, classes, "title") is None
    assert analysis.write_run_plots(tmp_path, overlays, classes) == [tmp_path / analysis.OVERLAY_PLOT]
    _assert_image(tmp_path / analysis.OVERLAY_PLOT)


def test_the_loaders_return_the_rounds_and_classes_metrics_csv_has(smoke_run):
    rows = _metrics(smoke_run / "metrics.csv")
    run = analysis.load_run(smoke_run)
    assert run.metrics == rows and run.summary["rounds"] == 2 and run.cases
    validation = [r for r in rows if r["phase"] == "validation"]
    rounds, dice = analysis.validation_dice(run.metrics)
    assert rounds == sorted({int(r["round"]) for r in validation}) == [0, 1]
    assert list(dice) == list(dict.fromkeys(r["class"] for r in validation))
    for cls, values in dice.items():
        expected = [
            np.mean([float(r["dice"]) for r in validation if (r["round"], r["class"]) == (str(i), cls)]) for i in rounds
        ]
        assert values == pytest.approx(expected)
    _, per_site = analysis.validation_dice(run.metrics, per_site=True)
    assert set(per_site) == {f"{r['site']}/{r['class']}" for r in validation}
    train = [r for r in rows if r["phase"] == "train"]
    rounds, curves = analysis.training_curves(run.metrics)
    assert rounds == [0, 1]
    assert set(curves) == {c for c in analysis.LOSSES + analysis.SCHEDULES if any(r[c] for r in train)}
    assert {"loss", "supervised", "condist", "condist_weight", "lr"} <= set(curves)  # ConDistFL


def _write_metrics(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_a_method_without_condist_plots_only_the_losses_it_has(tmp_path):
    train = [
        {
            "round": r,
            "phase": "train",
            "site": s,
            "model": "local",
            "loss": 1.0 - 0.1 * r,
            "supervised": 1.0,
            "lr": 0.01,
        }
        for r in range(3)
        for s in ("liver", "spleen")
    ]
    _write_metrics(tmp_path / "metrics.csv", train)
    rounds, curves = analysis.training_curves(analysis.load_run(tmp_path).metrics)
    assert rounds == [0, 1, 2] and list(curves) == ["loss", "supervised", "lr"]
    assert curves["loss"] == pytest.approx([1.0, 0.9, 0.8])
    # neither validation rows nor a summary (a run cut off in its first round): only the losses
    assert analysis.write_run_plots(tmp_path) == [tmp_path / analysis.LOSS_PLOT]
    _assert_image(tmp_path / analysis.LOSS_PLOT)


def test_a_standalone_run_has_its_final_bars_and_validation_curves_of_every_site_model(tmp_path):
    validation = [
        {"round": r, "phase": "validation", "site": s, "model": s, "class": s, "dice": 0.2 * (r + 1)}
        for r in range(2)
        for s in ("liver", "spleen")
    ]
    _write_metrics(tmp_path / "metrics.csv", validation)
    rounds, dice = analysis.validation_dice(analysis.load_run(tmp_path).metrics)
    assert rounds == [0, 1] and dice["spleen"] == pytest.approx([0.2, 0.4])
    summary = {
        "best_round": {"liver": 1, "spleen": 0},
        "test_dice": {"liver": 0.5, "spleen": None},
        "external_dice": {"ext": {"liver": 0.4, "spleen": math.nan}},
    }
    assert analysis.final_dice_figure(summary) is not None
    assert analysis.final_dice_figure({}) is None and analysis.losses_figure(validation) is None


def _finished_sweep(folder: Path, variants: dict[str, list[str]]) -> Path:
    """A sweep of `variants` × seeds 0, 1 whose runs look finished (config.yaml, summary.json,
    test_cases.csv); variant i scores 0.05·i lower."""
    folder.mkdir(exist_ok=True)
    path = _write_sweep(folder, SMOKE, seeds=[0, 1], variants=variants)
    for run in plan_runs(load_sweep(path)):
        _finish(run, ("summary.json",))
        _write_cases(run.folder / "test_cases.csv", _rows(0.05 * list(variants).index(run.variant), run.seed))
    return path


def test_a_sweep_plots_its_comparison_and_the_aggregation_frequency(tmp_path, capsys):
    variants = {
        "condistfl_1steps": ["fl.local_steps=1", "fl.rounds=4"],
        "condistfl_4steps": ["fl.local_steps=4", "fl.rounds=1"],
        "fedavg_1steps": ["method=fedavg", "fl.local_steps=1", "fl.rounds=4"],
        "fedavg_4steps": ["method=fedavg", "fl.local_steps=4", "fl.rounds=1"],
    }
    path = _finished_sweep(tmp_path, variants)
    assert main(["sweep", str(path), "--tables-only"]) == 0
    out = tmp_path / "out"
    assert f"{out / analysis.COMPARISON_PLOT}, {out / analysis.FREQUENCY_PLOT}" in capsys.readouterr().out
    for name in ("results.md", analysis.COMPARISON_PLOT, analysis.FREQUENCY_PLOT):
        assert (out / name).is_file()
    _assert_image(out / analysis.COMPARISON_PLOT)
    _assert_image(out / analysis.FREQUENCY_PLOT)


def test_the_frequency_plot_has_one_line_per_method_and_needs_varied_local_steps(tmp_path):
    variants = {
        "condistfl_1steps": ["fl.local_steps=1"],
        "condistfl_4steps": ["fl.local_steps=4"],
        "fedavg_4steps": ["method=fedavg", "fl.local_steps=4"],
    }
    runs = plan_runs(load_sweep(_finished_sweep(tmp_path / "varied", variants)))
    results, _ = collect_results(runs)
    per_run = {key: _class_means(headline_rows(rows), "test") for key, rows in results.items()}
    points = analysis.frequency_points({run.variant: run.cfg for run in runs}, per_run)
    assert {m: {s: len(v) for s, v in by.items()} for m, by in points.items()} == {
        "condistfl": {1: 2, 4: 2},
        "fedavg_4steps": {4: 2},  # a method alone keeps its variant's name
    }
    assert points["condistfl"][1][0] == pytest.approx(np.mean([0.7, 0.5, 0.9]))  # seed 0: its classes' mean
    assert analysis.sweep_frequency_points(tmp_path / "varied" / "out", per_run) == points  # from config.yaml

    path = _finished_sweep(tmp_path / "same", {"a": [], "b": ["method=fedavg"]})
    assert main(["sweep", str(path), "--tables-only"]) == 0
    assert (tmp_path / "same" / "out" / analysis.COMPARISON_PLOT).is_file()
    assert not (tmp_path / "same" / "out" / analysis.FREQUENCY_PLOT).exists()


def _results_folder(folder: Path) -> Path:
    """A sweep's results folder holding the results.csv of test_sweep's RESULTS (variants a, b and
    the standalone solo, seeds 0 and 1)."""
    (folder / analysis.RESULTS_FILE).write_text(results_csv(RESULTS))
    return folder


def test_the_sweep_table_read_from_results_csv_is_the_one_results_md_has(tmp_path):
    rows = analysis.load_results(_results_folder(tmp_path))
    per_run = analysis.test_dice_per_run(rows)
    assert per_run == {key: pytest.approx(_class_means(headline_rows(r), "test")) for key, r in RESULTS.items()}
    header, table = analysis.comparison_rows(per_run)
    assert header == ["class", "a", "b", "solo"]
    sweep = load_sweep(_write_sweep(tmp_path, SMOKE, seeds=[0, 1], variants={"a": [], "b": [], "solo": []}))
    md = results_markdown(sweep, RESULTS, [], "")
    test = md[md.index("## Test") : md.index("## external")]
    for row in table:
        assert "| " + " | ".join(row) + " |" in test
    assert analysis.standalone_variants(rows) == ["solo"]
    models, columns, matrix = analysis.cross_site_matrix(rows, "solo")
    assert (models, columns) == (["liver", "spleen"], ["liver/liver", "spleen/spleen"])
    assert matrix == pytest.approx(np.array([[0.8, 0.0], [0.15, 0.9]]))  # results.md's cross-site table
    _assert_image(
        analysis.write_png(tmp_path / "cross.png", analysis.cross_site_figure(models, columns, matrix, "solo"))
    )


def test_the_sweep_curves_are_each_variants_validation_dice_mean_over_seeds(tmp_path):
    for variant, seed, shift in (("a", 0, 0.0), ("a", 1, 0.2), ("b", 0, 0.1)):
        (tmp_path / "runs" / variant / f"seed{seed}").mkdir(parents=True)
        rounds = range(2) if variant == "a" else range(3)
        row = {"phase": "validation", "site": "liver", "model": "global", "class": "liver"}
        validation = [row | {"round": r, "dice": 0.3 * r + shift} for r in rounds]
        _write_metrics(tmp_path / "runs" / variant / f"seed{seed}" / "metrics.csv", validation)
    (tmp_path / "runs" / "a" / "seed0.log").write_text("")  # a sweep's log beside the folders is no run
    assert list(analysis.sweep_run_folders(tmp_path)) == [("a", 0), ("a", 1), ("b", 0)]
    curves = analysis.sweep_validation_dice(tmp_path)
    assert curves["a"][0] == [0, 1] and curves["a"][1]["liver"] == pytest.approx([0.1, 0.4])
    assert curves["b"][0] == [0, 1, 2] and curves["b"][1]["liver"] == pytest.approx([0.1, 0.4, 0.7])
    _assert_image(analysis.write_png(tmp_path / "curves.png", analysis.sweep_dice_figure(curves)))
    assert analysis.sweep_dice_figure({}) is None
