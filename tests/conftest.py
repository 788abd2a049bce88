"""Shared fixtures: paths, the smoke config, and one generated smoke federation per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_losses.py

# wandb never reaches the network from the tests, whatever the configs say
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


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
def smoke_run(data_home: Path, smoke_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-round federated run of `configs/smoke.yaml` through the CLI, shared by the tests
    that read its outputs."""
    import subprocess

    out = tmp_path_factory.mktemp("smoke_run")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_fl", "fit", "--config", str(smoke_config_path), f"output_dir={out}"],
        capture_output=True, text=True, cwd=REPO, env=os.environ | {"LIGHTNING_FL_DATA": str(data_home)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out
