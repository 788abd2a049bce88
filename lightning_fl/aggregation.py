"""Aggregation (`fl.aggregation`): how the sites' updates Δ_k become the next global model.

FedAvg adds the mean update to the weights; FedOpt treats the negated mean update as a gradient for
a server SGD with momentum (`docs/explanation/method.md`, FedOpt aggregation).

An aggregator is a function of (global state, updates, weights) plus, for FedOpt, its own server
optimizer state. Floating-point entries (parameters and buffers) are aggregated; integer buffers
(e.g. BatchNorm's step counter) are copied from the first site's update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import Tensor

from lightning_fl.config import ConfigError

StateDict = dict[str, Tensor]


def update_norm(update: StateDict) -> float:
    """The L2 norm of an update's floating-point entries, all of them as one vector."""
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values() if v.is_floating_point())))


def weighted_mean(updates: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Σ_k w_k Δ_k / Σ_k w_k for floating-point entries, the first update's value for the others."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"site weights must sum to a positive number, got {list(weights)}")
    mean = {}
    for key, first in updates[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first)
            for update, weight in zip(updates, weights):
                acc.add_(update[key], alpha=weight / total)
            mean[key] = acc
        else:
            mean[key] = first.clone()
    return mean


class Aggregator(Protocol):
    """What the server asks of an aggregation: the next weights from the sent ones and the updates,
    and its own state for `state.ckpt`."""

    def aggregate(self, global_state: StateDict, updates: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
        """The next weights of the model from the weights sent (`global_state`) and the weighted updates."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The aggregator's own state, for `state.ckpt`."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a resumed run)."""
        ...


class FedAvg:
    """Federated averaging, w ← w + Δ̄: the server adds the weighted mean update. It holds no state."""

    def state_dict(self) -> dict:
        """Nothing: FedAvg keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def aggregate(self, global_state: StateDict, updates: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
        """The weights plus the weighted mean update (integer buffers: the first update's)."""
        mean = weighted_mean(updates, weights)
        return {
            key: value + mean[key] if value.is_floating_point() else mean[key] for key, value in global_state.items()
        }


class FedOpt:
    """Server SGD with momentum on the pseudo-gradient −Δ̄, its learning rate cosine-decayed from
    `server_lr` to `server_lr_min` over the rounds; torch's SGD and scheduler do the arithmetic.

    It exists because, unlike FedAvg, the server carries state from round to round: it holds a copy
    of the floating-point weights as parameters, the SGD optimizer (its momentum buffers) and the
    cosine schedule of the server learning rate.
    """

    def __init__(self, global_state: StateDict, fl: DictConfig) -> None:
        self.params = {
            key: value.detach().clone().requires_grad_(True)
            for key, value in global_state.items()
            if value.is_floating_point()
        }
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=fl.server_lr, momentum=fl.server_momentum)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=fl.rounds, eta_min=fl.server_lr_min
        )

    def state_dict(self) -> dict:
        """The server momentum and learning-rate schedule (the parameters are reloaded every round)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the server momentum and schedule saved by `state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def aggregate(self, global_state: StateDict, updates: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
        """One server SGD step from `global_state` along −Δ̄ (integer buffers: the first update's)."""
        mean = weighted_mean(updates, weights)
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(global_state[key])
                param.grad = -mean[key]
        self.optimizer.step()
        self.scheduler.step()
        return {key: self.params[key].detach().clone() if key in self.params else mean[key] for key in global_state}


AGGREGATORS = {"fedavg": lambda fl, initial: FedAvg(), "fedopt": lambda fl, initial: FedOpt(initial, fl)}


def build_aggregator(fl: DictConfig, initial: StateDict) -> Aggregator:
    """The aggregation `fl.aggregation` names, starting from the model's initial weights."""
    if fl.aggregation not in AGGREGATORS:
        raise ConfigError(f"fl.aggregation: expected one of {sorted(AGGREGATORS)}, got {fl.aggregation!r}")
    return AGGREGATORS[fl.aggregation](fl, initial)
