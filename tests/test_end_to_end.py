"""A real 2-round federated run of configs/smoke.yaml through the CLI, and the CLI's errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from lightning_fl.config import load_config
from lightning_fl.networks import build_network

CLASSES = ["liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor"]
ORGANS = ["liver", "spleen", "pancreas", "kidney"]
EXTERNAL = ["external", "unenhanced"]
NO_DATA = "/nonexistent"  # LIGHTNING_FL_DATA for the commands that need no data home


def test_run_writes_every_output(smoke_run):
    expected = {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt", "summary.json"}
    assert expected <= {p.name for p in smoke_run.iterdir()}

    cfg = OmegaConf.load(smoke_run / "config.yaml")
    assert cfg.fl.rounds == 2 and cfg.output_dir == str(smoke_run)
    assert cfg.fabric.precision in ("bf16-mixed", "32-true")  # "auto" is resolved before saving

    rows = list(csv.DictReader((smoke_run / "metrics.csv").open()))
    train = [r for r in rows if r["phase"] == "train"]
    assert {(r["round"], r["site"]) for r in train} == {
        (str(i), s) for i in range(2) for s in ("liver", "spleen", "pancreas", "kidney")
    }
    assert all(float(r["supervised"]) > 0 and 0 < float(r["condist_weight"]) <= 1 for r in train)
    validation = [r for r in rows if r["phase"] == "validation"]
    assert {(r["round"], r["class"]) for r in validation} == {(str(i), c) for i in range(2) for c in CLASSES}
    assert {(r["site"], r["class"]) for r in rows if r["phase"] == "external"} == {
        (site, organ) for site in EXTERNAL for organ in ORGANS
    }

    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["best_round"] in (0, 1)
    assert list(summary["test_dice"]) == CLASSES
    assert list(summary["external_dice"]) == EXTERNAL  # each external site on its own
    assert all(set(dice) == set(ORGANS) for dice in summary["external_dice"].values())
    finite = [v for v in summary["test_dice"].values() if v is not None]
    assert summary["test_mean_dice"] == pytest.approx(sum(finite) / len(finite))
    external = [v for dice in summary["external_dice"].values() for v in dice.values()]
    assert all(0.0 <= v <= 1.0 for v in finite + external)

    stdout = (smoke_run / "stdout.txt").read_text()
    header = next(line for line in stdout.splitlines() if line.startswith("class"))
    assert "Best global model" in stdout and header.split() == [
        "class",
        "test",
        "Dice",
        "external",
        "Dice",
        "unenhanced",
        "Dice",
    ]


def test_checkpoints_hold_a_loadable_global_model(smoke_run):
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(smoke_run / name, weights_only=True)
        net = build_network(cfg.model, 1, len(cfg.labels.classes))
        net.load_state_dict(checkpoint["model"])
        assert checkpoint["classes"][0] == "background" and checkpoint["round"] in (0, 1)
    last = torch.load(smoke_run / "last.ckpt", weights_only=True)
    assert last["round"] == 1


def test_wandb_offline_run_is_written(smoke_run):
    runs = list((smoke_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.parametrize(
    "override,message",
    [
        ("fl.roundz=2", "Key 'roundz' not in 'FederationConfig'"),
        ("data.sites.1.classes=[spleen,spleeen]", "site 'spleen' (classes): unknown class 'spleeen'"),
        ("data.sites.3.classes=[]", "site 'kidney' (classes): a site must label at least one class"),
    ],
)
def test_cli_reports_config_mistakes_without_a_traceback(cli, override, message):
    result = cli("fit", "--config", "configs/smoke.yaml", override, data_home=NO_DATA)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_real_data_and_missing_gpu_are_clear_errors(cli, tmp_path):
    paper = [
        "fit",
        "--config",
        "configs/condistfl_paper.yaml",
        f"data.root={tmp_path}/none",
        f"output_dir={tmp_path}/run",
    ]
    result = cli(*paper, "fabric.accelerator=cpu", data_home=NO_DATA)
    assert result.returncode == 2
    assert f"data.root does not exist: {tmp_path}/none" in result.stderr
    if not torch.cuda.is_available():  # the paper's config asks for a GPU
        result = cli(*paper, data_home=NO_DATA)
        assert result.returncode == 2 and "fabric.accelerator=gpu, but PyTorch sees no CUDA GPU" in result.stderr


@pytest.mark.slow
def test_the_same_config_gives_the_same_numbers(cli, smoke_run, data_home, tmp_path):
    result = cli("fit", "--config", "configs/smoke.yaml", f"output_dir={tmp_path}", data_home=data_home)
    assert result.returncode == 0, result.stderr[-2000:]
    first = torch.load(smoke_run / "last.ckpt", weights_only=True)["model"]
    second = torch.load(tmp_path / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)

    def dice(run):
        rows = csv.DictReader((run / "metrics.csv").open())
        return [(r["round"], r["site"], r["class"], r["dice"]) for r in rows if r["dice"]]

    assert dice(smoke_run) == dice(tmp_path)
    assert not math.isnan(json.loads((tmp_path / "summary.json").read_text())["test_mean_dice"])


def test_synth_command_writes_the_layout_the_fit_reads(cli, tmp_path):
    out = tmp_path / "federation"
    result = cli("synth", "--out", str(out), "--config", "configs/smoke.yaml", data_home=NO_DATA)
    assert result.returncode == 0, result.stderr[-2000:]
    for site in ("liver", "spleen", "pancreas", "kidney", "external", "unenhanced"):
        datalist = json.loads((out / f"{site}.json").read_text())
        assert all(
            (out / item[key]).is_file()
            for split in ("training", "validation", "testing")
            for item in datalist[split]
            for key in ("image", "label")
        )
    again = cli("synth", "--out", str(out), "--config", "configs/smoke.yaml", data_home=NO_DATA)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_validation_every_k_rounds_chooses_the_best_among_the_validated(cli, data_home, tmp_path):
    result = cli(
        "fit",
        "--config",
        "configs/smoke.yaml",
        f"output_dir={tmp_path}",
        "fl.rounds=3",
        "fl.local_steps=1",
        "eval.every=2",
        "logger.wandb.mode=disabled",
        data_home=data_home,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {r["round"] for r in rows if r["phase"] == "validation"} == {"1", "2"}  # every 2nd round and the last
    assert {r["round"] for r in rows if r["phase"] == "train"} == {"0", "1", "2"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_round"] in (1, 2)
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["round"] == summary["best_round"]
