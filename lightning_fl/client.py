"""A federated client: receive the global weights, train N local steps, return Δ.

`Client.train(global_state, round) → Trained(Δ, steps, cases, metrics) | Dropped(reason)` is the
shape of MONAI's `ClientAlgo`, NVFlare's Client API and Flower's `ClientApp`, so an FL engine can
drive a client as the simulation in `federation.py` does. One optimizer step lives in `Client._step`.

A client trains on one site's data, or, for centralized training, on every site's: its sources
then take turns batch by batch, each supervised by its own site's labels.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lightning_fl.config import ConfigError
from lightning_fl.data.datasets import SiteData, TrainingStream
from lightning_fl.distributed import move_optimizer_state, site_seed
from lightning_fl.loggers import StepMeans
from lightning_fl.objective import Objective, StateDict


class ClientFailure(RuntimeError):
    """A client's round went wrong in a way that makes its update unusable (non-finite numbers)."""


@dataclass(frozen=True)
class Trained:
    """A client's answer after a round it trained."""

    delta: StateDict  # Δ = trained − received weights
    num_steps: int
    num_cases: int  # training cases, the weight of `fl.weighting=cases`
    metrics: dict[str, float]  # mean of each step metric over the round


@dataclass(frozen=True)
class Dropped:
    """A client's answer after a round that failed: its update is not aggregated."""

    reason: str


Answer = Trained | Dropped


class Client:
    """A federated client on this rank: what turns the weights it receives into the update it sends.

    It exists so that the round loop (or an FL engine) can drive a client through one call,
    `train(global_state, round) -> Trained | Dropped`, without knowing about Fabric, optimizers or
    data loaders. It holds its `Objective` module and SGD optimizer (set up by Fabric), the cosine
    schedule, which both persist across rounds (`state_dict` is what `state.ckpt` keeps of it), and
    one training stream per data source.

    `shard` = (this rank's position, ranks) in the client's block: a client trained by several ranks
    is data-parallel, each rank taking its share of every batch. `shares_rank`: another client
    trains on this rank, so the optimizer state is parked on the host between turns."""

    def __init__(
        self,
        name: str,
        sources: list[SiteData],
        objective: Objective,
        cfg: DictConfig,
        fabric: L.Fabric,
        shard: tuple[int, int],
        prepare: Any,
        shares_rank: bool = False,
        hide_bars: bool | None = True,
    ) -> None:
        self.name, self.cfg, self.fabric, self.shard, self.prepare = name, cfg, fabric, shard, prepare
        self.shares_rank, self.hide_bars = shares_rank, hide_bars
        self.steps_per_source = cfg.fl.local_steps
        self.num_steps = objective.steps_per_round  # the sources take turns: local_steps each
        self.num_cases = sum(d.num_training_cases for d in sources)
        opt = objective.configure_optimizers()
        self.module, self.optimizer = fabric.setup(objective, opt["optimizer"])
        self.scheduler: torch.optim.lr_scheduler.LRScheduler = opt["lr_scheduler"]["scheduler"]
        self.sources = [(d.name, TrainingStream(d, cfg.data, cfg.labels.classes)) for d in sources]
        self.step_means: StepMeans = fabric.logger  # where the objective's `log_dict` goes (build_fabric)
        # float16's gradient scaler: one per rank, shared by its clients, so each keeps its own scale
        # (loaded at the start of its turn, kept at the end of a round it trained) like its optimizer
        self.scaler: torch.amp.GradScaler | None = getattr(fabric.strategy.precision, "scaler", None)
        self.scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self.group: Any = None  # the process group of a data-parallel client
        if shard[1] > 1:
            patches = cfg.data.batch_size * cfg.data.samples_per_volume
            if patches % shard[1]:
                raise ConfigError(
                    f"site '{name}' is trained by {shard[1]} ranks, but its batch of data.batch_size × "
                    f"data.samples_per_volume = {patches} patches does not split evenly across them"
                )

    @property
    def objective(self) -> Objective:
        """The `Objective` module, unwrapped from Fabric's wrapper."""
        return self.module.module

    def data_parallel(self, group: Any) -> None:
        """Train with the ranks of `group`, each taking its share of every batch (`Objective.data_parallel`)."""
        device = self.fabric.device
        self.group = group
        self.objective.data_parallel(group, [device.index] if device.type == "cuda" else None)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and (float16) gradient scaler: what carries over from round to round
        (and into state.ckpt)."""
        state = {"optimizer": self.optimizer.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state | ({"scaler": self.scaler_state} if self.scaler_state is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (a resumed run); a state without a scaler's (saved at
        another precision) leaves the scaler at its initial scale."""
        self.optimizer.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler_state = state["scaler"]

    def train(self, global_state: StateDict, round: int) -> Answer:
        """Round `round` (numbered from 1); an exception or a non-finite loss or update drops this
        round's update (saying why) and resets the optimizer state, which may hold the same
        non-finite values."""
        try:
            delta, metrics = self._train(global_state, round)
        except Exception as err:  # noqa: BLE001 - any failure of one client must not end the federation
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()
            self.step_means.pop()
            return Dropped(str(err) if isinstance(err, ClientFailure) else f"{type(err).__name__}: {err}")
        return Trained(delta, self.num_steps, self.num_cases, metrics)

    def _train(self, global_state: StateDict, round: int) -> tuple[StateDict, dict[str, float]]:
        objective, device = self.objective, self.fabric.device
        torch.manual_seed(site_seed(self.cfg.seed, self.name, round))  # dropout: the client's, not the process's
        batches = self._batches(round)
        objective.receive(global_state, round)
        move_optimizer_state(self.optimizer, device)
        if self.scaler is not None:
            self.scaler.load_state_dict(self.scaler_state)
        self.module.train()
        steps = tqdm(range(self.num_steps), desc=f"  {self.name}", leave=False, disable=self.hide_bars)
        skipped, in_a_row = 0, 0
        for step in steps:
            loss, skip = self._step(next(batches), step)
            skipped, in_a_row = skipped + skip, in_a_row + 1 if skip else 0
            if in_a_row == self.cfg.fabric.max_consecutive_skips:
                raise ClientFailure(
                    f"{in_a_row} optimizer steps in a row skipped by the gradient scaler up to local step {step + 1}, "
                    f"the limit fabric.max_consecutive_skips (its gradients overflow float16; scale now "
                    f"{self.scaler.get_scale():g})"
                )
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if self.shares_rank:
            move_optimizer_state(self.optimizer, torch.device("cpu"))
        means = self.step_means.pop()
        if self.scaler is not None:
            self.scaler_state = self.scaler.state_dict()
            means["skipped_steps"] = float(skipped)  # the same on every rank of a data-parallel client
        if self.shard[1] > 1:  # a data-parallel client reports the mean over its ranks' shares
            values = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
            dist.all_reduce(values, group=self.group)
            means = dict(zip(means, (values / self.shard[1]).tolist()))
        update = objective.update(global_state)
        broken = [key for key, value in update.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise ClientFailure(f"non-finite update in {len(broken)} tensors, e.g. '{broken[0]}'")
        return update, means

    def _batches(self, round: int) -> Iterator[dict[str, Any]]:
        """The round's batches on the device: each source's stream is seeded by (run, its site, round)
        alone; several sources take turns, one batch each."""
        streams = [
            stream.start_round(site_seed(self.cfg.seed, name, round), self.steps_per_source, self.shard)
            for name, stream in self.sources
        ]
        device = self.fabric.device
        for step in range(self.num_steps):
            source = step % len(streams)
            batch = next(streams[source])
            yield {
                "image": self.prepare(batch["image"].as_subclass(torch.Tensor)),
                "label": batch["label"].as_subclass(torch.Tensor).to(device),
                "source": source,
            }

    def _step(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, bool]:
        """One optimizer step: forward and loss under Fabric's precision, a finiteness check that the
        ranks of a data-parallel client agree on, backward, clipping, step, schedule. Returns the
        loss and whether the gradient scaler skipped the step: under float16 an overflowing
        gradient is routine (the scaler skips the step and lowers its scale), elsewhere a failure."""
        with self.fabric.autocast():  # Fabric applies its precision to forward(), not to training_step()
            loss = self.module.training_step(batch, step)
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.shard[1] > 1:  # the ranks of a data-parallel site stop together, before DDP's all-reduce
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.group)
        if not finite:
            raise ClientFailure(f"non-finite loss at local step {step + 1}")
        self.fabric.backward(loss)
        clip = self.cfg.optim.grad_clip_norm
        if clip > 0:
            norm = self.fabric.clip_gradients(self.module, self.optimizer, max_norm=clip, error_if_nonfinite=False)
            if self.scaler is None and not torch.isfinite(norm):
                raise ClientFailure(f"non-finite gradient norm at local step {step + 1}")
        scale = self.scaler.get_scale() if self.scaler is not None else 0.0
        self.optimizer.step()  # under a scaler: skipped where the gradients overflowed, the scale then lowered
        skipped = self.scaler is not None and self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # PyTorch warns when a first step was skipped: the schedule counts it
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
            self.scheduler.step()  # steps taken or skipped alike, as every other site's schedule
        return loss, skipped
