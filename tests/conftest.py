"""Shared fixtures: paths, the smoke config, one generated smoke federation per session, the command
line run as a subprocess (`cli`) and the real CT volumes (`realdata`, skipped where absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lightning_fl.labels import label_space_from_config
from lightning_fl.networks import build_network
from lightning_fl.site import Site

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REALDATA = SHARED / "realdata"  # the real CT volumes; only next to the development checkout
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_losses.py

# wandb never reaches the network from the tests, whatever the configs say
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


class Cli:
    """Runs `python -m lightning_fl ...` (or any Python command line) in a subprocess from the repo root.

    The subprocess inherits this process's environment (WANDB_MODE=offline above, and
    LIGHTNING_FL_DATA once `data_home` has set it); `data_home=` overrides LIGHTNING_FL_DATA for
    that one command.
    """

    @staticmethod
    def _env(data_home: Path | str | None) -> dict[str, str] | None:
        return None if data_home is None else os.environ | {"LIGHTNING_FL_DATA": str(data_home)}

    def __call__(
        self, *args: str, data_home: Path | str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """`lightning-fl *args`, waited for; its output captured as text."""
        return self.python("-m", "lightning_fl", *args, data_home=data_home, timeout=timeout)

    def fit_smoke(self, out: Path, *overrides: str, data_home: Path | str | None = None) -> subprocess.CompletedProcess:
        """`lightning-fl fit` of configs/smoke.yaml into `out` with `overrides`, which must succeed."""
        result = self("fit", "--config", "configs/smoke.yaml", f"output_dir={out}", *overrides, data_home=data_home)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def python(
        self, *args: str, data_home: Path | str | None = None, cwd: Path = REPO, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """`python *args` (a script and its arguments), waited for; its output captured as text."""
        return subprocess.run(
            [sys.executable, *map(str, args)],
            check=False,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=self._env(data_home),
            timeout=timeout,
        )

    def start(self, *args: str, data_home: Path | str | None = None, capture: bool = True) -> subprocess.Popen:
        """`lightning-fl *args` started in its own session (so `os.killpg` reaches every rank), not
        waited for; its output piped as text when `capture`, else discarded."""
        output = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_fl", *args],
            cwd=REPO,
            text=True,
            env=self._env(data_home),
            start_new_session=True,
            stdout=output,
            stderr=output,
        )


def make_site(cfg: DictConfig, foreground: list[int]) -> Site:
    """A real Site of one data source labelling `foreground`, with seeded fresh student and teacher networks."""
    labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
    torch.manual_seed(0)
    student, teacher = (build_network(cfg.model, 1, labels.num_classes) for _ in range(2))
    return Site([foreground], labels, student=student, teacher=teacher, cfg=cfg, steps_per_round=cfg.fl.local_steps)


@pytest.fixture(scope="session")
def cli() -> Cli:
    """The command line in a subprocess: `cli("fit", ...)`, `cli.python(script, ...)`, `cli.start(...)`."""
    return Cli()


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The folder of real CT volumes; the test is skipped where it is absent (a user's clone)."""
    if not REALDATA.is_dir():
        pytest.skip(
            f"needs the real CT volumes, which are not here: {REALDATA} is absent "
            "(they sit only beside the development checkout, never in a user's clone)"
        )
    return REALDATA


@pytest.fixture(scope="session")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic federations are generated under a session folder, never in the user's cache."""
    home = tmp_path_factory.mktemp("data_home")
    os.environ["LIGHTNING_FL_DATA"] = str(home)
    return home


@pytest.fixture(scope="session")
def smoke_config_path() -> Path:
    return REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_run(cli: Cli, data_home: Path, smoke_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-round federated run of `configs/smoke.yaml` through the CLI, shared by the tests
    that read its outputs."""
    out = tmp_path_factory.mktemp("smoke_run")
    result = cli("fit", "--config", str(smoke_config_path), f"output_dir={out}", data_home=data_home)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out
