"""The simulated federation end to end: a real 2-round run of configs/smoke.yaml through the CLI and
what it writes, the best round chosen on the validation curve, standalone sites that never
aggregate and train on their own cases, centralized training on every site's labels."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from lightning_fl.build import build_run
from lightning_fl.config import load_config
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.networks import build_network
from lightning_fl.run_folder import RunFolder
from tests.helpers.cli import refused, run_main
from tests.helpers.runs import SMOKE

CLASSES = ["liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor"]
ORGANS = ["liver", "spleen", "pancreas", "kidney"]
EXTERNAL = ["external", "unenhanced"]


def _validation_means(rows: list[dict[str, str]]) -> dict[int, float]:
    """Each validated round's mean Dice over the sites' classes (the score that selects the best round)."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if row["phase"] == "validation" and row["dice"] not in ("", "nan"):
            values.setdefault(int(row["round"]), []).append(float(row["dice"]))
    return {r: float(np.mean(v)) for r, v in values.items()}


def test_a_run_writes_every_output_with_rounds_numbered_from_one(smoke_run):
    expected = {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt", "summary.json", "test_cases.csv"}
    assert expected <= {p.name for p in smoke_run.iterdir()}
    folder = RunFolder(smoke_run)
    cfg = folder.read_config()
    assert cfg.fl.rounds == 2 and cfg.output_dir == str(smoke_run)
    assert cfg.fabric.precision in ("bf16-mixed", "32-true")  # "auto" is resolved before saving

    rows = folder.read_metrics()
    assert rows == list(csv.DictReader(folder.metrics.open()))  # read as written: a format-2 file is not shifted
    train = [r for r in rows if r["phase"] == "train"]
    assert {(r["round"], r["site"]) for r in train} == {(str(i), s) for i in (1, 2) for s in ORGANS}
    assert all(float(r["supervised"]) > 0 and 0 < float(r["condist_weight"]) <= 1 for r in train)
    validation = [r for r in rows if r["phase"] == "validation"]
    assert {(r["round"], r["class"]) for r in validation} == {(str(i), c) for i in (1, 2) for c in CLASSES}
    assert {(r["site"], r["class"]) for r in rows if r["phase"] == "external"} == {
        (site, organ) for site in EXTERNAL for organ in ORGANS
    }

    summary = folder.read_summary()
    assert list(summary["test_dice"]) == CLASSES
    assert list(summary["external_dice"]) == EXTERNAL  # each external site on its own
    assert all(set(dice) == set(ORGANS) for dice in summary["external_dice"].values())
    finite = [v for v in summary["test_dice"].values() if v is not None]
    assert summary["test_mean_dice"] == pytest.approx(sum(finite) / len(finite))
    external = [v for dice in summary["external_dice"].values() for v in dice.values()]
    assert all(0.0 <= v <= 1.0 for v in finite + external)

    stdout = smoke_run.with_suffix(".stdout").read_text()
    header = next(line for line in stdout.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "test", "Dice", "external", "Dice", "unenhanced", "Dice"]
    assert f"Best global model: after round {summary['best_round']} of 2" in stdout


def test_the_best_round_is_the_argmax_of_the_validation_curve_and_its_model_is_best_ckpt(smoke_run):
    folder = RunFolder(smoke_run)
    means, summary = _validation_means(folder.read_metrics()), folder.read_summary()
    assert sorted(means) == [1, 2]
    best = max(means, key=lambda r: (means[r], -r))  # the first of equal rounds
    assert summary["best_round"] == best
    assert summary["best_validation_dice"] == pytest.approx(means[best], abs=1e-5)  # metrics.csv keeps 6 digits
    cfg = load_config(SMOKE)
    for name, saved_round in (("best", best), ("last", 2)):
        checkpoint = torch.load(folder.model(name), weights_only=True)
        assert checkpoint["round"] == saved_round and checkpoint["classes"][0] == "background"
        build_network(cfg.model, 1, len(cfg.labels.classes)).load_state_dict(checkpoint["model"])
    test_rows = [r for r in folder.read_metrics() if r["phase"] == "test"]
    assert {r["round"] for r in test_rows} == {str(best)}  # the test scores are of the best round's model


@pytest.mark.slow
def test_validation_every_k_rounds_chooses_the_best_among_the_validated(data_home, tmp_path):
    cfg = load_config(
        SMOKE,
        [f"output_dir={tmp_path}", "fl.rounds=3", "fl.local_steps=1", "eval.every=2", "logger.wandb.mode=disabled"],
    )
    summary = Federation(cfg, build_fabric(cfg)).fit()
    rows = RunFolder(tmp_path).read_metrics()
    assert {r["round"] for r in rows if r["phase"] == "validation"} == {"2", "3"}  # every 2nd round and the last
    assert {r["round"] for r in rows if r["phase"] == "train"} == {"1", "2", "3"}
    means = _validation_means(rows)
    assert summary["best_round"] == max(means, key=lambda r: (means[r], -r))
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["round"] == summary["best_round"]
    assert not math.isnan(torch.load(tmp_path / "last.ckpt", weights_only=True)["score"])  # round 3 is validated


@pytest.mark.parametrize(
    "override,message",
    [
        ("fl.roundz=2", "Key 'roundz' not in 'FederationConfig'"),
        ("data.sites.1.classes=[spleen,spleeen]", "site 'spleen' (classes): unknown class 'spleeen'"),
        ("data.sites.3.classes=[]", "site 'kidney' (classes): a site must label at least one class"),
        ("fl.strategy=fedavg", "fl.strategy is now called fl.aggregation"),
    ],
)
def test_config_mistakes_are_one_line_errors(capsys, override, message):
    status, _, err = run_main(capsys, "fit", "--config", SMOKE, override)
    assert status == 2 and message in err and len(err.splitlines()) == 1


def test_a_warm_start_begins_from_the_checkpoint_and_a_wrong_one_is_refused_before_anything_is_written(
    smoke_run, fit_2d, capsys, tmp_path
):
    best = smoke_run / "best.ckpt"
    warm = build_run(load_config(SMOKE, [f"model.init_checkpoint={best}"])).network.state_dict()
    saved = torch.load(best, weights_only=True)["model"]
    assert warm.keys() == saved.keys() and all(torch.equal(warm[k], saved[k]) for k in warm)
    cold = build_run(load_config(SMOKE)).network.state_dict()  # the seeded random start differs
    assert any(not torch.equal(cold[k], warm[k]) for k in warm)
    out = tmp_path / "run"
    line = refused(
        capsys, "fit", "--config", SMOKE, f"model.init_checkpoint={fit_2d / 'best.ckpt'}", f"output_dir={out}"
    )
    assert "holds a 2D network, but this config's model is 3D" in line and not out.exists()
    line = refused(
        capsys, "fit", "--config", SMOKE, f"model.init_checkpoint={tmp_path / 'x.ckpt'}", f"output_dir={out}"
    )
    assert f"checkpoint not found: {tmp_path / 'x.ckpt'}" in line and not out.exists()


def test_missing_real_data_and_missing_gpu_are_clear_errors(capsys, tmp_path):
    paper = [
        "fit",
        "--config",
        "configs/condistfl_paper.yaml",
        f"data.root={tmp_path}/none",
        f"output_dir={tmp_path}/r",
    ]
    status, _, err = run_main(capsys, *paper, "fabric.accelerator=cpu")
    assert status == 2 and f"data.root does not exist: {tmp_path}/none" in err
    if not torch.cuda.is_available():  # the paper's config asks for a GPU
        status, _, err = run_main(capsys, *paper)
        assert status == 2 and "fabric.accelerator=gpu, but PyTorch sees no CUDA GPU" in err


def test_synth_writes_the_layout_fit_reads_and_never_over_a_folder(capsys, tmp_path):
    out = tmp_path / "federation"
    status, stdout, _ = run_main(capsys, "synth", "--out", out, "--config", SMOKE)
    assert status == 0 and stdout.startswith("wrote the synthetic federation")
    for site in ORGANS + EXTERNAL:
        content = json.loads((out / f"{site}.json").read_text())
        assert all(
            (out / item[key]).is_file()
            for split in ("training", "validation", "testing")
            for item in content[split]
            for key in ("image", "label")
        )
    status, _, err = run_main(capsys, "synth", "--out", out, "--config", SMOKE)
    assert status == 2 and "already exists" in err


# ---------------------------------------------------------------- standalone and centralized
def _training_files(federation: Federation, site: str) -> set[str]:
    return {item["image"] for item in federation.site_data[site].splits["training"]}


@pytest.mark.slow
def test_standalone_sites_never_aggregate_and_train_on_their_own_cases(standalone_run, data_home, tmp_path):
    federation, seen = standalone_run.federation, standalone_run.batches
    sites = list(federation.site_data)
    assert federation.topology.models == sites
    for site in sites:
        assert [s for s, _ in federation.clients[site].sources] == [site]
        assert {path for path, _, _ in seen[site]} <= _training_files(federation, site) and len(seen[site]) == 2
    # each model moved by its own site's update alone: exactly the model of a one-site federation
    one = load_config(
        SMOKE,
        [
            "data.synthetic=null",
            f"data.root={data_home / 'synthetic-smoke'}",
            "data.external=[]",
            "method=fedavg",
            "data.sites=[{name: liver, datalist: liver.json, classes: [liver, liver_tumor]}]",
            f"output_dir={tmp_path / 'one_site'}",
            "logger.wandb.mode=disabled",
            "fl.local_steps=1",
        ],
    )
    alone = Federation(one, build_fabric(one))
    alone.fit()
    models = federation.server.models
    for key, value in models["liver"].items():
        assert torch.equal(value, alone.server.models["global"][key]), key
    assert any(not torch.equal(models["liver"][k], models["spleen"][k]) for k in models["liver"])
    # every site's model on every site: a site's model cannot segment what its site never labelled
    summary = standalone_run.summary
    assert set(summary["cross_site"]) == set(sites)
    assert all(set(per_site) == set(sites) | set(federation.external) for per_site in summary["cross_site"].values())
    rows = RunFolder(standalone_run.folder).read_cases()
    assert {(r.model, r.site) for r in rows} == {(m, s) for m in sites for s in sites + list(federation.external)}
    assert all((standalone_run.folder / f"best_{site}.ckpt").is_file() for site in sites)


@pytest.mark.slow
def test_centralized_training_sees_every_sites_cases_with_that_sites_labels(centralized_run):
    federation, seen = centralized_run.federation, centralized_run.batches
    sources = [name for name, _ in federation.clients["pooled"].sources]
    assert list(federation.clients) == ["pooled"] and sources == list(federation.site_data)
    steps = seen["pooled"]
    assert [index for _, index, _ in steps] == [0, 1, 2, 3]  # the sites take turns, one batch each
    objective = federation.clients["pooled"].objective
    for path, index, values in steps:
        data = federation.site_data[sources[index]]
        assert path in _training_files(federation, data.name)
        assert set(values) <= {0, *data.foreground}  # each case carries only its site's annotation
        assert objective.supervised_losses[index].foreground == data.foreground  # and is supervised by it
    cfg = federation.cfg
    assert federation.clients["pooled"].scheduler.T_max == cfg.fl.rounds * 4 * cfg.fl.local_steps
