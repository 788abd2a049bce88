"""The server's bookkeeping on the clients' answers: a site that raises, returns a NaN loss or
diverges is dropped for the round (a `Dropped` answer, with a warning in the metrics); the global
model stays finite; too few updates stop the run cleanly; the best round is the best validated one."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics

import pytest
import torch

from lightning_fl.aggregation import update_norm
from lightning_fl.client import Dropped, Trained
from lightning_fl.config import load_config
from lightning_fl.distributed import build_fabric
from lightning_fl.errors import RunStopped
from lightning_fl.federation import Federation


def _federation(smoke_config_path, out, *overrides: str) -> Federation:
    cfg = load_config(smoke_config_path, [f"output_dir={out}", "logger.wandb.mode=disabled", *overrides])
    return Federation(cfg, build_fabric(cfg))


def _break(federation: Federation, site: str, how: str, from_round: int = 1) -> None:
    local = federation.clients[site]
    step = local.objective.training_step

    def broken_step(batch, batch_idx):
        if local.objective.round < from_round:
            return step(batch, batch_idx)
        if how == "raise":
            raise RuntimeError("the scanner's export went wrong")
        if how == "nan":
            return step(batch, batch_idx) * math.nan
        for group in local.optimizer.param_groups:  # "diverge": a step so large the weights overflow
            group["lr"] = 1e30
        return step(batch, batch_idx)

    local.objective.training_step = broken_step


def _rows(out, phase):
    return [r for r in csv.DictReader((out / "metrics.csv").open()) if r["phase"] == phase]


@pytest.mark.slow
def test_failed_sites_are_dropped_and_the_global_model_stays_finite(data_home, smoke_config_path, tmp_path):
    federation = _federation(smoke_config_path, tmp_path)
    for site, how in (("spleen", "raise"), ("pancreas", "nan"), ("kidney", "diverge")):
        _break(federation, site, how)
    answers = federation.train_clients(1)  # what the server is given: typed answers, one per client
    assert isinstance(answers["liver"], Trained) and answers["liver"].num_steps == 2
    assert answers["pancreas"] == Dropped("non-finite loss at local step 1")
    summary = federation.fit()  # round 1 again, from the start: nothing was aggregated

    dropped = {(r["round"], r["site"]): r["note"] for r in _rows(tmp_path, "dropped")}
    assert set(dropped) == {(str(r), s) for r in (1, 2) for s in ("spleen", "pancreas", "kidney")}
    assert "RuntimeError: the scanner's export went wrong" in dropped[("1", "spleen")]
    assert dropped[("1", "pancreas")] == "non-finite loss at local step 1"
    assert dropped[("1", "kidney")] == "non-finite gradient norm at local step 2"
    assert {r["site"] for r in _rows(tmp_path, "train")} == {"liver"}
    model = torch.load(tmp_path / "last.ckpt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in federation.network.state_dict().values())
    validation = _rows(tmp_path, "validation")
    means = [
        statistics.mean(float(r["dice"]) for r in validation if r["round"] == str(k) and r["dice"] != "nan")
        for k in (1, 2)
    ]
    assert summary["best_round"] == 1 + means.index(max(means))  # the round with the best validation mean


def test_too_few_updates_stop_the_run_with_the_last_checkpoint_intact(data_home, smoke_config_path, tmp_path):
    federation = _federation(smoke_config_path, tmp_path, "fl.min_sites=2")
    for site in ("spleen", "pancreas", "kidney"):
        _break(federation, site, "raise", from_round=2)
    with pytest.raises(
        RunStopped, match=r"round 2: 1 of 4 sites sent an update, fewer than fl.min_sites=2; dropped: spleen: "
    ):
        federation.fit()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["round"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len(_rows(tmp_path, "dropped")) == 3 and not (tmp_path / "summary.json").exists()


def test_min_sites_must_fit_the_federation(smoke_config_path):
    from lightning_fl.config import ConfigError

    with pytest.raises(ConfigError, match=r"fl.min_sites must lie in \[1, 4\]"):
        load_config(smoke_config_path, ["fl.min_sites=5"])


@pytest.mark.slow
def test_a_site_sending_a_million_times_its_update_is_dropped_like_a_failed_one(data_home, smoke_config_path, tmp_path):
    """A finite but absurd update (a bug, a corrupted batch, a hostile site) is dropped by the norm
    bound, and the run is the run in which that site failed (one round: each round is bounded alike)."""
    bounded = _federation(smoke_config_path, tmp_path / "bounded", "fl.rounds=1")
    train = bounded.clients["kidney"].train

    def inflated(global_state, round):
        answer = train(global_state, round)
        return dataclasses.replace(answer, delta={k: v * 1e6 for k, v in answer.delta.items()})

    bounded.clients["kidney"].train = inflated
    bounded.fit()
    failed = _federation(smoke_config_path, tmp_path / "failed", "fl.rounds=1")
    _break(failed, "kidney", "raise")
    failed.fit()

    notes = {r["round"]: r["note"] for r in _rows(tmp_path / "bounded", "dropped")}
    assert set(notes) == {"1"} and all(r["site"] == "kidney" for r in _rows(tmp_path / "bounded", "dropped"))
    assert "is more than fl.max_update_ratio=10 times the round's median" in notes["1"]
    for name in ("best.ckpt", "last.ckpt"):
        guarded, without = (
            torch.load(tmp_path / run / name, weights_only=True)["model"] for run in ("bounded", "failed")
        )
        assert all(torch.equal(guarded[k], without[k]) for k in without)


def test_with_clipping_an_outlying_update_is_scaled_down_to_the_bound_and_aggregated(
    data_home, smoke_config_path, tmp_path
):
    """fl.outlier_update=clip: the 10⁶-scaled update is kept at 10 × the round's median norm, said
    in a `clipped` row, and the global model stays finite."""
    federation = _federation(smoke_config_path, tmp_path, "fl.outlier_update=clip", "fl.rounds=1")
    answers = federation.train_clients(1)
    inflated = answers["kidney"]
    answers["kidney"] = dataclasses.replace(inflated, delta={k: v * 1e6 for k, v in inflated.delta.items()})
    median = statistics.median(update_norm(a.delta) for a in answers.values())
    federation.server.drop_failed(1, answers)
    assert isinstance(answers["kidney"], Trained)
    assert update_norm(answers["kidney"].delta) == pytest.approx(10 * median, rel=1e-5)
    federation.server.aggregate(answers)
    assert all(torch.isfinite(v).all() for v in federation.server.models["global"].values() if v.is_floating_point())
    federation.server.logger.commit(step=1, round=1)
    (row,) = _rows(tmp_path, "clipped")
    assert row["site"] == "kidney" and "is more than fl.max_update_ratio=10 times the round's median" in row["note"]
    assert not _rows(tmp_path, "dropped")
