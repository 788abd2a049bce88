"""One site of an NVFlare job, through NVFlare's Client API: receive the global model, score it on
the site's validation split when the server asks (it is the model the previous round made), train
`fl.local_steps` with ConDist against it as teacher (`client.SiteClient`, as `fit` does), and send
the weight difference, the number of steps and cases, the training losses and the Dice.

The site builds what `Federation` builds for one site, in the same order from the same seed, so its
updates are those `fit` computes for it (docs/how-to/nvflare.md says what may still differ).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey, ParamsType
from omegaconf import DictConfig, OmegaConf

from lightning_fl.client import SiteClient
from lightning_fl.config import ConfigError, config_from_container
from lightning_fl.data.datasets import evaluation_loader, load_site, prepare_data_root
from lightning_fl.distributed import build_fabric
from lightning_fl.errors import UserInputError
from lightning_fl.evaluation import nanmean, score_cases
from lightning_fl.flare import CONFIG_FILE, DROPPED, NUM_CASES, TRAIN, TRAIN_METRICS, VALIDATE_RECEIVED
from lightning_fl.inference import Predictor
from lightning_fl.labels import label_space_from_config
from lightning_fl.networks import build_network
from lightning_fl.site import freeze


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


class FlareSite:
    """A site's client and its validation split, built as `Federation` builds them for one site.

    It holds the Fabric, the frozen network that is the teacher and the scored model, the
    `SiteClient` (module, optimizer and schedule, which persist across rounds in this process)
    and the validation loader (volumes kept across rounds)."""

    def __init__(self, cfg: DictConfig, name: str) -> None:
        sites = {s.name: s for s in cfg.data.sites}
        if name not in sites:
            raise ConfigError(f"NVFlare site '{name}' is not one of data.sites {list(sites)} of the job's config")
        self.cfg, self.name = cfg, name
        self.labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        fabric = build_fabric(cfg)
        fabric.seed_everything(cfg.seed, verbose=False)
        self.network = freeze(build_network(cfg.model, in_channels=1, out_channels=self.labels.num_classes))
        self.predictor = Predictor(self.network, fabric, cfg.model.channels_last)
        self.data = load_site(prepare_data_root(cfg, self.labels), sites[name], self.labels)
        student = build_network(cfg.model, in_channels=1, out_channels=self.labels.num_classes)
        self.client = SiteClient(
            name, [self.data], self.labels, student, self.network, cfg, fabric, (0, 1), self.predictor.prepare
        )
        self.validation = evaluation_loader(self.data.splits["validation"], cfg.data)

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
        update = self.client.train(state, received.current_round)
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: update.num_steps, NUM_CASES: update.num_cases}
        if update.delta is None:
            return FLModel(metrics=dice, meta=meta | {DROPPED: update.metrics["dropped"]})
        delta = {k: v.cpu().contiguous() for k, v in update.delta.items()}  # safetensors' requirement
        meta[TRAIN_METRICS] = update.metrics
        return FLModel(params_type=ParamsType.DIFF, params=delta, metrics=dice, meta=meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="site_script.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config") / CONFIG_FILE, help="the job's config")
    parser.add_argument("--data-root", type=Path, help="this site's data root (default: the config's data.root)")
    args = parser.parse_args(argv)
    flare.init()
    try:
        site = FlareSite(site_config(read_job_config(args.config), args.data_root), flare.get_site_name())
    except UserInputError as err:
        print(f"error: site {flare.get_site_name()}: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    while flare.is_running():
        received = flare.receive()
        if received is None:  # the job ended
            break
        flare.send(site.answer(flare.get_task_name(), received))
