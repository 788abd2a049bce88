"""The site module: ConDist weight schedule, frozen teacher, persistent optimizer state."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lightning_fl.config import MethodConfig, load_config
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.site import condist_weight


def test_condist_weight_rises_linearly_from_first_to_last_round():
    method = OmegaConf.structured(MethodConfig())
    weights = [condist_weight(method, r, 5) for r in range(5)]
    assert weights[0] == pytest.approx(0.01) and weights[-1] == pytest.approx(1.0)
    assert weights == pytest.approx([0.01 + r * 0.99 / 4 for r in range(5)])
    assert condist_weight(method, 0, 1) == pytest.approx(0.01)


@pytest.fixture(scope="module")
def federation(data_home, smoke_config_path, tmp_path_factory) -> Federation:
    out = tmp_path_factory.mktemp("site_run")
    cfg = load_config(smoke_config_path, [f"output_dir={out}", "logger.wandb.mode=disabled", "fl.local_steps=3"])
    return Federation(cfg, build_fabric(cfg))


def test_teacher_is_frozen_and_unchanged_while_the_student_learns(federation):
    runtime = federation.clients["liver"]
    site = runtime.site
    global_state = federation.models["global"]
    result = runtime.train(global_state, round_index=0)
    update, metrics = result.delta, result.metrics
    assert (result.num_steps, result.num_cases) == (3, 2)

    assert not site.teacher.training and site.student.training
    assert not any(p.requires_grad for p in site.teacher.parameters())
    for key, value in site.teacher.state_dict().items():
        torch.testing.assert_close(value, global_state[key], rtol=0, atol=0)
    changed = [k for k, v in site.student.state_dict().items() if not torch.equal(v, global_state[k])]
    assert len(changed) > len(global_state) // 2
    # the update is the student's difference only; the teacher never leaves the site
    assert set(update) == set(site.student.state_dict())
    assert any(update[k].abs().max() > 0 for k in changed)
    # the optimizer holds the student's parameters and nothing of the teacher's
    optimized = {id(p) for group in runtime.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in site.student.parameters()}
    assert optimized.isdisjoint(id(p) for p in site.teacher.parameters())
    assert {"supervised", "condist", "condist_weight", "loss", "lr"} <= set(metrics)


def test_optimizer_and_schedule_persist_across_rounds(federation):
    runtime = federation.clients["spleen"]
    global_state = federation.models["global"]
    runtime.train(global_state, round_index=0)
    momentum = {id(p): runtime.optimizer.state[p]["momentum_buffer"].clone() for p in runtime.site.student.parameters()}
    steps_done = runtime.scheduler.last_epoch
    # a new round: new global weights arrive; the momentum and the schedule carry on
    runtime.site.receive(global_state, round_index=1)
    for p in runtime.site.student.parameters():
        torch.testing.assert_close(runtime.optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    runtime.train(global_state, round_index=1)
    assert runtime.scheduler.last_epoch == steps_done + federation.cfg.fl.local_steps
    assert runtime.optimizer.param_groups[0]["lr"] < federation.cfg.optim.lr


def test_sites_of_a_process_share_one_student_and_one_teacher(federation):
    """Only the optimizer state is per site: a process's memory grows by that, not by a model, per site."""
    sites = [local.site for local in federation.clients.values()]
    assert len(sites) == 4
    assert all(s.teacher is federation.network for s in sites)
    assert all(s.network is sites[0].network for s in sites)
    optimizers = [local.optimizer for local in federation.clients.values()]
    assert len({id(o.optimizer) for o in optimizers}) == 4  # each site its own SGD (own momentum buffers)
