"""The one recipe that turns a resolved config into the parts of a run, in a fixed order:

    label space ─▶ seed ─▶ global network (its initial weights) ─▶ topology      (`build_run`)
    then, in a process that trains: one student network ─▶ a client per site it trains (`build_clients`)

`fit` (`federation.Federation`), both sides of an NVFlare job, the benchmarks and the tests build a
run here, so the initial global model is the same, bitwise, wherever a run is built (the seed is
drawn from before anything else), and a new network kind, method or data layout is added here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_fl.checkpoint import check_compatible
from lightning_fl.client import Client
from lightning_fl.data.datasets import SiteData
from lightning_fl.inference import read_model_file
from lightning_fl.labels import LabelSpace
from lightning_fl.networks import build_network
from lightning_fl.objective import Objective, freeze
from lightning_fl.server import Server, Topology


@dataclass(frozen=True)
class RunParts:
    """What every side of a run shares: its config, label space, topology and the global network."""

    cfg: DictConfig
    labels: LabelSpace
    topology: Topology
    # holds the initial global weights; frozen: in a process that trains, the clients' teacher and
    # the network that scores a model (one object, reloaded for each)
    network: nn.Module

    def server(self, fabric: L.Fabric | None = None) -> Server:
        """The run's server, starting from the initial global weights."""
        return Server(self.cfg, self.labels, self.topology, self.network, fabric)

    def new_network(self) -> nn.Module:
        """Another network of the run's architecture (a student; its weights are overwritten each round)."""
        return build_network(self.cfg.model, in_channels=1, out_channels=self.labels.num_classes)

    def objective(self, tasks: list[list[int]], student: nn.Module) -> Objective:
        """What a client trains on sources labelling `tasks` (one foreground set each): `student`
        against the run's network as frozen teacher, its schedule over every local step of the run."""
        steps = self.cfg.fl.local_steps * len(tasks)  # the sources of a client take turns, batch by batch
        return Objective(tasks, self.labels, student=student, teacher=self.network, cfg=self.cfg, steps_per_round=steps)


def build_run(cfg: DictConfig) -> RunParts:
    """Label space, seed, the global network's initial weights (random, or `model.init_checkpoint`'s),
    topology: in this order."""
    labels = LabelSpace.of(cfg.labels)
    L.Fabric.seed_everything(cfg.seed, verbose=False)  # the same initial model in every process
    network = freeze(build_network(cfg.model, in_channels=1, out_channels=labels.num_classes))
    if cfg.model.init_checkpoint is not None:  # a warm start: checked like any model file this project reads
        path = Path(cfg.model.init_checkpoint).expanduser()
        saved = read_model_file(path)
        check_compatible(path, saved["model"], saved["classes"], network, list(labels.classes))
        network.load_state_dict(saved["model"])
    return RunParts(cfg, labels, Topology.of(cfg.method.training, [s.name for s in cfg.data.sites]), network)


def build_clients(
    run: RunParts,
    fabric: L.Fabric,
    data: dict[str, SiteData],
    shards: dict[str, tuple[int, int]],
    prepare: Callable[[Tensor], Tensor],
    hide_bars: bool | None = True,
) -> dict[str, Client]:
    """A client for each of `shards` (the clients this process trains, with its share of each), on
    the sites' `data`; they share one student network and the run's network as teacher."""
    student = run.new_network()
    clients = {}
    for name, shard in shards.items():
        sources = [data[site] for site in run.topology.clients[name]]
        objective = run.objective([source.foreground for source in sources], student)
        clients[name] = Client(name, sources, objective, run.cfg, fabric, shard, prepare, len(shards) > 1, hide_bars)
    return clients
