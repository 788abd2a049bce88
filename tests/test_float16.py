"""float16 under a gradient scaler, run on the CPU (torch's CPU autocast and `GradScaler("cpu")`, the
logic a GPU without bf16 runs): an overflowing step is skipped and counted, not a site failure; a
site fails only after `fabric.max_consecutive_skips` skips in a row; each site's scale is saved in
state.ckpt, so a run stopped and resumed ends bitwise as the run left alone."""

from __future__ import annotations

import csv
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import MixedPrecision

import lightning_fl.checkpoint as checkpoint
import lightning_fl.distributed as distributed
from lightning_fl.checkpoint import load_model
from lightning_fl.cli import main
from tests.helpers.cli import run_main
from tests.helpers.runs import SMOKE

# float16 is emulated on CPUs (30 times slower than bf16 on a 2-core EPYC): one local step a round (round 1's
# overflows at the initial scale, round 2's does not at the scale it left), the last round validated
FIT = (
    "fit",
    "--config",
    SMOKE,
    "logger.wandb.mode=disabled",
    "fabric.accelerator=cpu",
    "eval.every=2",
    "fl.local_steps=1",
)
INITIAL_SCALE, BACKOFF = 2.0**40, 2.0**-24  # the first step overflows float16; then 2^16, which does not


class Float16Fabric(L.Fabric):
    """Fabric with float16 autocast and a gradient scaler on the CPU, as on a GPU without bf16
    (asked for `16-mixed` on a CPU, Lightning itself runs bf16)."""

    def __init__(self, *, precision: str, **kwargs: Any) -> None:
        assert precision == "16-mixed"
        scaler = torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE, backoff_factor=BACKOFF)
        super().__init__(plugins=[MixedPrecision("16-mixed", "cpu", scaler)], **kwargs)


@pytest.fixture(scope="module")
def float16() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "resolve_precision", lambda settings: "16-mixed")
        patch.setattr(L, "Fabric", Float16Fabric)
        yield


@pytest.fixture(scope="module")
def alone(data_home: Path, float16: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-round float16 run, left alone."""
    run = tmp_path_factory.mktemp("float16") / "alone"
    assert main([str(a) for a in (*FIT, f"output_dir={run}")]) == 0
    return run


def _skipped(run: Path) -> dict[tuple[int, str], float]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return {(int(r["round"]), r["site"]): float(r["skipped_steps"]) for r in rows if r["phase"] == "train"}


def test_overflowing_steps_are_skipped_and_counted_and_each_site_keeps_its_scale(alone):
    skipped = _skipped(alone)
    assert skipped == {(r, site): float(r == 1) for r in (1, 2) for site in ("liver", "spleen", "pancreas", "kidney")}
    assert "dropped" not in (alone / "metrics.csv").read_text()
    state = load_model(alone / "state.ckpt")
    # each site's own scale, lowered once by its own skip (a scaler shared across sites: 4 times)
    assert {saved["scaler"]["scale"] for saved in state["sites"].values()} == {INITIAL_SCALE * BACKOFF}
    assert json.loads((alone / "summary.json").read_text())["precision"] == "16-mixed"


def test_a_site_whose_steps_are_skipped_too_often_in_a_row_fails(capsys, float16, alone, tmp_path):
    status, _, err = run_main(capsys, *FIT, f"output_dir={tmp_path / 'run'}", "fabric.max_consecutive_skips=1")
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert "dropped the update of site 'liver': 1 optimizer steps in a row skipped by the gradient scaler" in err
    assert "fewer than fl.min_sites" in err.splitlines()[-1]


@pytest.mark.slow
def test_a_float16_run_stopped_after_round_1_resumes_bitwise_to_the_run_left_alone(
    capsys, float16, alone, monkeypatch, tmp_path
):
    """Round 2 starts from each site's saved scale: from the initial one, its first steps would be
    skipped again and the weights differ."""
    stopped = tmp_path / "stopped"
    write, states = checkpoint._atomic_write, []

    def full_disk(path: Path, contents: Any) -> None:  # round 2's state.ckpt cannot be written
        states.extend([path] if path.name == "state.ckpt" else [])
        if len(states) == 2 and path.name == "state.ckpt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, contents)

    monkeypatch.setattr(checkpoint, "_atomic_write", full_disk)
    status, _, err = run_main(capsys, *FIT, f"output_dir={stopped}")
    assert status == 2 and "No space left on device" in err, err[-3000:]
    assert load_model(stopped / "state.ckpt")["round"] == 1
    monkeypatch.setattr(checkpoint, "_atomic_write", write)
    assert run_main(capsys, "fit", "--resume", stopped)[0] == 0
    first, second = (load_model(r / "last.ckpt")["model"] for r in (alone, stopped))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert _skipped(stopped) == _skipped(alone)
