"""The session's environment and its expensive runs, each made once and shared by every test that reads it.

    smoke_run        `lightning-fl fit` of configs/smoke.yaml through the CLI, W&B offline (overlays every round)
    reference_fit    the same config exactly: float32, one thread, no W&B; what the bitwise tests compare with
    standalone_run   method=standalone in this process, every batch each client drew recorded
    centralized_run  method=centralized in this process, likewise

Helpers are in `tests/helpers/`; the real CT volumes (`realdata`) sit beside the development checkout only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_fl.config import load_config, to_yaml
from lightning_fl.data.datasets import prepare_data_root
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.labels import LabelSpace
from tests.helpers.cli import Cli
from tests.helpers.runs import EXACT, REPO, SMOKE, SMOKE_2D, SMOKE_WANDB, made_once, session_root

REALDATA = REPO.parent / "shared" / "realdata"  # the real CT volumes; only next to the development checkout


@pytest.fixture(scope="session", autouse=True)
def environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """W&B offline and silent, and synthetic federations under the session's folder, never in the
    user's cache; with pytest-xdist's workers, one thread per worker and per process it starts
    (torch's threads spin while they wait: two workers of two threads each on two cores ran the
    suite slower). The environment is restored after the session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        home = session_root(tmp_path_factory) / "data_home"
        patch.setenv("LIGHTNING_FL_DATA", str(home))
        threads = torch.get_num_threads()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            patch.setenv("OMP_NUM_THREADS", "1")
            torch.set_num_threads(1)
        yield home
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restored_environment() -> Iterator[None]:
    """Whatever a test sets in the environment (Lightning's seeding sets PL_GLOBAL_SEED, a test
    may set LIGHTNING_FL_DATA) is undone after it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def data_home(environment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data home, holding the smoke config's synthetic federation (generated once)."""

    def generate(_: Path) -> None:
        cfg = load_config(SMOKE)
        prepare_data_root(cfg, LabelSpace.of(cfg.labels))

    made_once(tmp_path_factory, "smoke_federation", generate)
    return environment


@pytest.fixture(scope="session")
def smoke_config_path() -> Path:
    return SMOKE


@pytest.fixture(scope="session")
def flat_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config in one file: it loads in half the time of the composed one (a sweep's base)."""
    path = tmp_path_factory.mktemp("base") / "smoke_flat.yaml"
    path.write_text(to_yaml(load_config(SMOKE)))
    return path


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
def smoke_run(cli: Cli, data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-round federated run of configs/smoke.yaml through the CLI, W&B offline; its stdout
    is kept beside it (`smoke_run.stdout`)."""

    def fit(out: Path) -> None:
        result = cli.fit_smoke(out, *SMOKE_WANDB)
        out.with_suffix(".stdout").write_text(result.stdout)

    return made_once(tmp_path_factory, "smoke_run", fit)


@pytest.fixture(scope="session")
def reference_fit(cli: Cli, data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config trained exactly (float32, one thread, no W&B) in one process: what the
    2-process, resumed and NVFlare runs must give bitwise."""
    return made_once(tmp_path_factory, "reference_fit", lambda out: cli.fit_smoke(out, *EXACT, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="session")
def fit_2d(cli: Cli, data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/smoke_2d.yaml trained exactly (float32, one thread) in one process, W&B offline with
    every round's overlays: what the 2D tests and the 2-process 2D run compare with."""

    def fit(out: Path) -> None:
        result = cli("fit", "--config", str(SMOKE_2D), f"output_dir={out}", *EXACT, *SMOKE_WANDB, OMP_NUM_THREADS="1")
        assert result.returncode == 0, result.stderr[-3000:]

    return made_once(tmp_path_factory, "fit_2d", fit)


@dataclass
class RecordedRun:
    """A run trained in this process, with every batch each client drew: (case file, source, label values)."""

    federation: Federation
    summary: dict[str, Any]
    batches: dict[str, list[tuple[str, int, list[int]]]]

    @property
    def folder(self) -> Path:
        return self.federation.server.folder.path


def _recorded(cfg: Any) -> RecordedRun:
    federation = Federation(cfg, build_fabric(cfg))
    batches: dict[str, list[tuple[str, int, list[int]]]] = {name: [] for name in federation.clients}
    for name, client in federation.clients.items():
        for index, (_, stream) in enumerate(client.sources):

            def start_round(
                *args: Any, _start: Any = stream.start_round, _name: str = name, _index: int = index
            ) -> Any:
                for batch in _start(*args):
                    for path, label in zip(batch["image"].meta["filename_or_obj"], batch["label"]):
                        batches[_name].append((path, _index, sorted(int(v) for v in label.unique())))
                    yield batch

            stream.start_round = start_round
    return RecordedRun(federation, federation.fit(), batches)


@pytest.fixture(scope="session")
def standalone_run(data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    """method=standalone, 2 rounds × 1 local step, W&B offline, trained in this process."""
    out = tmp_path_factory.mktemp("standalone")
    return _recorded(load_config(SMOKE, ["method=standalone", f"output_dir={out}", "fl.local_steps=1"]))


@pytest.fixture(scope="session")
def centralized_run(data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    """method=centralized, 1 round × 1 local step per site, W&B offline, trained in this process."""
    out = tmp_path_factory.mktemp("centralized")
    return _recorded(load_config(SMOKE, ["method=centralized", f"output_dir={out}", "fl.rounds=1", "fl.local_steps=1"]))
