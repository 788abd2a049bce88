"""What the tests build runs from: the smoke config, the overrides of an exact (bitwise) run, one
objective built by the project's recipe, and folders made once per test session."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

import lightning_fl.checkpoint as checkpoint
from lightning_fl.build import build_run
from lightning_fl.checkpoint import RunFolderError
from lightning_fl.objective import Objective
from lightning_fl.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
SMOKE_2D = REPO / "configs" / "smoke_2d.yaml"
# float32 on the CPU, without W&B: the runs that bitwise comparisons are made between (also with one
# thread per process: oneDNN's float32 sums depend on the thread count on some CPUs)
EXACT = ("fabric.accelerator=cpu", "fabric.precision=32-true", "logger.wandb.mode=disabled")
# the session's smoke run's W&B settings: every round's overlays, and a group, job type, tags and notes
SMOKE_WANDB = (
    "logger.wandb.mode=offline",
    "logger.wandb.image_every=1",
    "logger.wandb.group=g",
    "logger.wandb.job_type=variant",
    "logger.wandb.tags=[demo]",
    "logger.wandb.notes=a note",
)


def experiment_script(name: str) -> Any:
    """experiments/NAME.py imported as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def make_objective(cfg: DictConfig, foreground: list[int]) -> Objective:
    """A real objective of one data source labelling `foreground`, built by the run's recipe."""
    run = build_run(cfg)
    return run.objective([foreground], run.new_network())


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder, shared by the pytest-xdist workers of one run where there are several."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """`session folder/name`, made by `make(folder)` once per test session: the first worker to ask
    makes it while the others wait (a file lock), and later ones find it made."""
    root = session_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            make(folder)
            done.touch()
    return folder


def assert_reads_as_format_2(folder: RunFolder) -> None:
    """A finished run folder's record reads with this version: metrics with rounds numbered from 1
    (every one of its config.yaml's), its summary's best round among them, its test cases."""
    cfg = OmegaConf.load(folder.config)
    rounds = {int(row["round"]) for row in folder.read_metrics() if row["phase"] == "train"}
    assert rounds == set(range(1, cfg.fl.rounds + 1)), folder
    best = folder.read_summary()["best_round"]
    assert all(r in rounds for r in (best.values() if isinstance(best, dict) else [best])), folder
    assert folder.read_cases(), folder


def kill_in_round_2(cli: Any, out: Path, *overrides: str, config: Path = SMOKE, **env: str) -> None:
    """Start the fit of `config` (the smoke's) into `out`, and SIGKILL every rank once it is training round 2."""
    process = cli.start("fit", "--config", str(config), f"output_dir={out}", *overrides, capture=False, **env)
    deadline = time.monotonic() + 300
    while not (out / "state.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunFolderError, match="is in use"):
        RunFolder(out).lock()  # held by the running fit
    time.sleep(0.3)  # into round 2's local training
    os.killpg(process.pid, signal.SIGKILL)  # every rank at once
    process.wait()
    assert torch.load(out / "state.ckpt", weights_only=True)["round"] == 1, "the kill did not land in round 2"


def last_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.ckpt", weights_only=True)["model"]


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every later staged write of a file called `name` fails as on a full disk (ENOSPC)."""
    stage = checkpoint._stage

    def full_disk(target: Path, write: Any) -> Path:
        if target.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return stage(target, write)

    monkeypatch.setattr(checkpoint, "_stage", full_disk)
