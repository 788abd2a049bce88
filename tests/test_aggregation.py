"""FedAvg and FedOpt arithmetic on hand-made state dicts."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lightning_fl.aggregation import AGGREGATORS, FedAvg, FedOpt, build_aggregator, weighted_mean
from lightning_fl.config import ConfigError, FederationConfig


def _state(w: list[float], b: float, steps: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor(w), "bias": torch.tensor([b]), "num_batches_tracked": torch.tensor(steps)}


GLOBAL = _state([1.0, 2.0], 0.5, 10)
UPDATES = [_state([0.2, -0.4], 0.1, 13), _state([0.4, 0.0], -0.3, 17)]


def test_fedavg_equal_weights_adds_mean_update_and_copies_integer_buffers():
    new = FedAvg().aggregate(GLOBAL, UPDATES, [1.0, 1.0])
    torch.testing.assert_close(new["weight"], torch.tensor([1.3, 1.8]))
    torch.testing.assert_close(new["bias"], torch.tensor([0.4]))
    assert new["num_batches_tracked"].item() == 13  # integer buffers: copied, not averaged
    assert new["num_batches_tracked"].dtype == torch.int64


def test_fedavg_weighted_by_case_count():
    new = FedAvg().aggregate(GLOBAL, UPDATES, [1.0, 3.0])  # e.g. 10 and 30 training cases
    torch.testing.assert_close(new["weight"], torch.tensor([1.0 + 0.05 + 0.3, 2.0 - 0.1 + 0.0]))


def test_fedopt_is_server_sgd_with_momentum_on_minus_mean_update():
    fl = OmegaConf.structured(FederationConfig(rounds=4, server_lr=1.0, server_lr_min=0.9, server_momentum=0.6))
    aggregator = FedOpt(GLOBAL, fl)
    # round 1: lr 1.0, momentum buffer = -Δ̄ → w + Δ̄
    w1 = aggregator.aggregate(GLOBAL, UPDATES, [1.0, 1.0])
    torch.testing.assert_close(w1["weight"], torch.tensor([1.3, 1.8]))
    # round 2: lr = 0.9 + 0.1 (1 + cos(π/4)) / 2; buffer = 0.6 buffer - Δ̄
    w2 = aggregator.aggregate(w1, UPDATES, [1.0, 1.0])
    lr1 = 0.9 + 0.1 * (1 + math.cos(math.pi / 4)) / 2
    buffer = 0.6 * torch.tensor([-0.3, 0.2]) + torch.tensor([-0.3, 0.2])
    torch.testing.assert_close(w2["weight"], w1["weight"] - lr1 * buffer)
    torch.testing.assert_close(w2["bias"], w1["bias"] - lr1 * (0.6 * torch.tensor([0.1]) + torch.tensor([0.1])))
    assert w2["num_batches_tracked"].item() == 13


def test_fedopt_with_zero_momentum_and_unit_lr_is_fedavg():
    fl = OmegaConf.structured(FederationConfig(rounds=3, server_lr=1.0, server_lr_min=1.0, server_momentum=0.0))
    opt, avg = FedOpt(GLOBAL, fl), FedAvg()
    a = b = GLOBAL
    for _ in range(3):
        a, b = opt.aggregate(a, UPDATES, [2.0, 1.0]), avg.aggregate(b, UPDATES, [2.0, 1.0])
    for key in GLOBAL:
        torch.testing.assert_close(a[key], b[key])


def test_weights_must_match_updates():
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_mean(UPDATES, [1.0])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean(UPDATES, [0.0, 0.0])


def test_the_aggregation_is_chosen_by_name_and_an_unknown_name_is_refused():
    fl = OmegaConf.structured(FederationConfig())
    assert set(AGGREGATORS) == set(FederationConfig.__dataclass_fields__["aggregation"].metadata["rule"].choices)
    assert isinstance(build_aggregator(fl, GLOBAL), FedOpt)
    fl.aggregation = "fedavg"
    assert isinstance(build_aggregator(fl, GLOBAL), FedAvg)
    fl = OmegaConf.create({"aggregation": "fedsgd"})  # a config that bypassed the schema's check
    with pytest.raises(ConfigError, match=r"fl.aggregation: expected one of \['fedavg', 'fedopt'\], got 'fedsgd'"):
        build_aggregator(fl, GLOBAL)
