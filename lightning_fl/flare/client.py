"""One site of an NVFlare job, through NVFlare's Client API: receive the global model, score it on
the site's validation split when the server asks (it is the model the previous round made), train
`fl.local_steps` with ConDist against it as teacher (`client.Client`, as `fit` does), and send
the weight difference, the number of steps and cases, the training losses and the Dice.

The site builds its client with `fit`'s recipe (`build.build_run`, `build.build_clients`), so its
updates are those `fit` computes for it (docs/how-to/nvflare.md says what may still differ). Its
optimizer and schedule, which `fit` keeps in state.ckpt, stay on the site's own disk (`SiteStateStore`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey, ParamsType
from omegaconf import DictConfig, OmegaConf

from lightning_fl.build import build_clients, build_run
from lightning_fl.checkpoint import load_model, save_state
from lightning_fl.client import Dropped
from lightning_fl.config import ConfigError, config_from_container
from lightning_fl.data.datasets import evaluation_loader, load_site, prepare_data_root
from lightning_fl.distributed import build_fabric
from lightning_fl.errors import UserInputError
from lightning_fl.evaluation import score_cases
from lightning_fl.flare import (
    CONFIG_FILE,
    DROPPED,
    NUM_CASES,
    RUN_ID,
    SAVED_ROUND,
    TRAIN,
    TRAIN_METRICS,
    VALIDATE_RECEIVED,
)
from lightning_fl.inference import Predictor
from lightning_fl.results import nanmean


def read_job_config(path: Path) -> DictConfig:
    """The run's config that the job carries, checked like a config file."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: the job's config (an app runs from its app folder)")
    return config_from_container(OmegaConf.to_container(OmegaConf.load(path)), [], str(path))


def site_config(cfg: DictConfig, data_root: Path | None) -> DictConfig:
    """The config as a site runs it: its own data root (a job parameter) in place of the exporting
    machine's, and one process."""
    if data_root is not None:
        cfg.data.root = str(data_root)
    cfg.fabric.devices, cfg.fabric.num_nodes, cfg.fabric.strategy = 1, 1, "auto"
    return cfg


DEFAULT_STATE_DIR = Path("~/.cache/lightning_fl/nvflare-sites")


class SiteStateStore:
    """A site's optimizer and schedule after each round it trained, on its own disk
    (`<dir>/<run id>/<site>/round-NNNN.ckpt`), so that a site process started again, for a job
    resumed after the server stopped, continues as `fit --resume` would.

    The server may resume from its last saved round S while the site has trained one or two rounds
    more (a validated round is saved once the next round's Dice arrive), so the site keeps every
    state after S and the newest one up to S."""

    def __init__(self, root: Path, site: str) -> None:
        self.root, self.site = root.expanduser(), site

    def _files(self, run_id: str) -> dict[int, Path]:
        """Each saved state by the round after which it was saved."""
        folder = self.root / run_id / self.site
        return {int(p.stem.removeprefix("round-")): p for p in sorted(folder.glob("round-*.ckpt"))}

    def save(self, run_id: str, round: int, state: dict[str, Any], saved_round: int) -> None:
        """Keep the state after `round`; drop those no resume from `saved_round` on can need."""
        save_state(self.root / run_id / self.site / f"round-{round:04d}.ckpt", state)
        files = self._files(run_id)
        kept = max((r for r in files if r <= saved_round), default=None)
        for r, path in files.items():
            if r < saved_round and r != kept:
                path.unlink(missing_ok=True)

    def load(self, run_id: str, before: int) -> tuple[int, dict[str, Any]] | None:
        """The newest state saved before round `before`, and its round; None: none was."""
        files = self._files(run_id)
        newest = max((r for r in files if r < before), default=None)
        return None if newest is None else (newest, load_model(files[newest]))


class FlareClient:
    """One site's side of an NVFlare job: its client and its validation split, built by `fit`'s recipe.

    It holds the Fabric, the frozen network that is the teacher and the scored model, the
    `Client` (module, optimizer and schedule, which persist across rounds in this process)
    and the validation loader (volumes kept across rounds)."""

    def __init__(self, cfg: DictConfig, name: str, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        sites = {s.name: s for s in cfg.data.sites}
        if name not in sites:
            raise ConfigError(f"NVFlare site '{name}' is not one of data.sites {list(sites)} of the job's config")
        self.cfg, self.name = cfg, name
        fabric = build_fabric(cfg)
        run = build_run(cfg)
        self.labels, self.network = run.labels, run.network
        self.predictor = Predictor(self.network, fabric, cfg.model)
        self.data = load_site(prepare_data_root(cfg, self.labels), sites[name], self.labels)
        self.client = build_clients(run, fabric, {name: self.data}, {name: (0, 1)}, self.predictor.prepare)[name]
        self.validation = evaluation_loader(self.data.splits["validation"], cfg.data)
        self.store, self.trained = SiteStateStore(state_dir, name), False

    def validate(self, state: dict[str, Any]) -> dict[str, float]:
        """The received model's Dice per class on this site's validation split (mean over cases)."""
        self.network.load_state_dict(state)
        dice = score_cases(
            self.predictor, self.validation, self.data.foreground, self.labels, self.cfg.eval, self.predictor.prepare
        )
        return {name: nanmean(values) for name, values in dice.items()}

    def answer(self, task: str, received: FLModel) -> FLModel:
        """The reply to one task: the Dice of the received model when asked, and after `train` the
        update (Δ = trained − received) with its step count, case count and losses, or why it failed."""
        state = received.params
        dice = self.validate(state) if received.meta.get(VALIDATE_RECEIVED) else {}
        if task != TRAIN:
            return FLModel(metrics=dice)
        run_id, r = received.meta[RUN_ID], received.current_round
        if not self.trained and r > 1:  # this process starts in a run that has trained rounds
            self._restore(run_id, r)
        answer = self.client.train(state, r)
        self.trained = True
        self.store.save(run_id, r, self.client.state_dict(), received.meta[SAVED_ROUND])
        if isinstance(answer, Dropped):
            meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: 0, NUM_CASES: self.client.num_cases}
            return FLModel(metrics=dice | {DROPPED: answer.reason}, meta=meta)
        delta = {k: v.cpu().contiguous() for k, v in answer.delta.items()}  # safetensors' requirement
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: answer.num_steps, NUM_CASES: answer.num_cases}
        return FLModel(
            params_type=ParamsType.DIFF, params=delta, metrics=dice, meta=meta | {TRAIN_METRICS: answer.metrics}
        )

    def _restore(self, run_id: str, round: int) -> None:
        """The optimizer and schedule this site had before round `round` of the run."""
        saved = self.store.load(run_id, round)
        folder = self.store.root / run_id / self.name
        if saved is None:
            print(
                f"warning: site {self.name}: no saved state of run {run_id} before round {round} in "
                f"{folder}; its optimizer and schedule start afresh (the run will differ from fit's)",
                file=sys.stderr,
            )
            return
        self.client.load_state_dict(saved[1])
        print(f"site {self.name}: continuing from its state after round {saved[0]} ({folder})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="site_script.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config") / CONFIG_FILE, help="the job's config")
    parser.add_argument("--data-root", type=Path, help="this site's data root (default: the config's data.root)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where this site keeps its optimizer state between rounds (default: {DEFAULT_STATE_DIR})",
    )
    args = parser.parse_args(argv)
    flare.init()
    site: FlareClient | None = None
    try:
        cfg = site_config(read_job_config(args.config), args.data_root)
        site = FlareClient(cfg, flare.get_site_name(), args.state_dir)
    except UserInputError as err:  # answered every round, so the server's run folder says why
        cannot_start = f"cannot start: {err}"
        print(f"error: site {flare.get_site_name()}: {cannot_start}", file=sys.stderr)
    while flare.is_running():
        received = flare.receive()
        if received is None:  # the job ended
            break
        if site is None:
            flare.send(
                FLModel(metrics={DROPPED: cannot_start}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0, NUM_CASES: 0})
            )
        else:
            flare.send(site.answer(flare.get_task_name(), received))
