"""A client's objective and the client that trains it: the ConDist weight schedule, the frozen
teacher, optimizer state that persists across rounds, FedProx's proximal gradient and each of
ConDist's switches."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from lightning_fl.build import build_run
from lightning_fl.config import MethodConfig, load_config
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.labels import LabelSpace
from lightning_fl.losses import ConDistDiceLoss, KDLoss, PseudoLabelLoss
from lightning_fl.objective import Objective, condist_weight
from tests.helpers.runs import make_objective


def test_condist_weight_rises_linearly_from_first_to_last_round():
    method = OmegaConf.structured(MethodConfig())
    weights = [condist_weight(method, r, 5) for r in range(1, 6)]  # rounds 1 to 5
    assert weights[0] == pytest.approx(0.01) and weights[-1] == pytest.approx(1.0)
    assert weights == pytest.approx([0.01 + r * 0.99 / 4 for r in range(5)])
    assert condist_weight(method, 1, 1) == pytest.approx(0.01)


@pytest.fixture(scope="module")
def federation(data_home, smoke_config_path, tmp_path_factory) -> Federation:
    out = tmp_path_factory.mktemp("objective_run")
    cfg = load_config(smoke_config_path, [f"output_dir={out}", "logger.wandb.mode=disabled", "fl.local_steps=3"])
    return Federation(cfg, build_fabric(cfg))


def test_teacher_is_frozen_and_unchanged_while_the_student_learns(federation):
    runtime = federation.clients["liver"]
    site = runtime.objective
    global_state = federation.server.models["global"]
    result = runtime.train(global_state, round=1)
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
    global_state = federation.server.models["global"]
    runtime.train(global_state, round=1)
    momentum = {
        id(p): runtime.optimizer.state[p]["momentum_buffer"].clone() for p in runtime.objective.student.parameters()
    }
    steps_done = runtime.scheduler.last_epoch
    # a new round: new global weights arrive; the momentum and the schedule carry on
    runtime.objective.receive(global_state, round=2)
    for p in runtime.objective.student.parameters():
        torch.testing.assert_close(runtime.optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    runtime.train(global_state, round=2)
    assert runtime.scheduler.last_epoch == steps_done + federation.cfg.fl.local_steps
    assert runtime.optimizer.param_groups[0]["lr"] < federation.cfg.optim.lr


def test_clients_of_a_process_share_one_student_and_one_teacher(federation):
    """Only the optimizer state is per client: a process's memory grows by that, not by a model, per site."""
    sites = [local.objective for local in federation.clients.values()]
    assert len(sites) == 4
    assert all(s.teacher is federation.network for s in sites)
    assert all(s.network is sites[0].network for s in sites)
    optimizers = [local.optimizer for local in federation.clients.values()]
    assert len({id(o.optimizer) for o in optimizers}) == 4  # each site its own SGD (own momentum buffers)


# ---------------------------------------------------------------- FedProx
def _objective(cfg, foreground: list[int]) -> tuple[Objective, L.Fabric]:
    return make_objective(cfg, foreground), L.Fabric(accelerator="cpu", devices=1, precision="32-true")


def _set_up_with_a_batch(cfg) -> tuple[Objective, L.Fabric, object, dict]:
    """The liver site's objective set up by Fabric, its module, and one seeded random batch."""
    site, fabric = _objective(cfg, [1, 2])
    module, _ = fabric.setup(site, site.configure_optimizers()["optimizer"])
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(1, 1, *cfg.data.patch_size, generator=generator),
        "label": torch.randint(0, 3, (1, 1, *cfg.data.patch_size), generator=generator),
    }
    return site, fabric, module, batch


def test_fedprox_adds_mu_times_the_distance_to_the_global_model_to_the_gradient(smoke_config_path):
    grads, sites = {}, {}
    for mu in (0.0, 0.3):
        cfg = load_config(
            smoke_config_path, ["method=fedprox", f"method.proximal_mu={mu}", "model.channels_last=false"]
        )
        site, fabric, module, batch = _set_up_with_a_batch(cfg)
        generator = torch.Generator().manual_seed(1)
        site.receive(site.teacher.state_dict(), 1)
        with torch.no_grad():  # the student has moved away from the global model it received
            for p in site.network.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        fabric.backward(module.training_step(batch, 0))
        grads[mu] = [p.grad.clone() for p in site.network.parameters()]
        sites[mu] = site
    site = sites[0.3]
    for g0, g, w, w_global in zip(grads[0.0], grads[0.3], site.network.parameters(), site.teacher.parameters()):
        torch.testing.assert_close(g - g0, 0.3 * (w - w_global), rtol=1e-4, atol=1e-6)
    assert any((w - t).abs().max() > 0 for w, t in zip(site.network.parameters(), site.teacher.parameters()))


# ---------------------------------------------------------------- ConDist's switches
def _condist_case(filter_foreground: bool, by: str = "organ"):
    """A site labelling class 1 of classes [bg, organ, its tumour, other]; the teacher calls some
    label-background voxels class 1."""
    labels = LabelSpace(tuple(["background", "organ", "organ_tumor", "other"]), {"organ_tumor": "organ"})
    foreground = [1]
    loss = ConDistDiceLoss(4, foreground, labels.background_groups(foreground, by), foreground_filter=filter_foreground)
    generator = torch.Generator().manual_seed(0)
    label = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    label[..., :2, :] = 1
    teacher = torch.randn(1, 4, 6, 6, generator=generator)
    teacher[:, 1, 2:4] = 10.0  # rows 2-3: label background, the teacher's argmax a local foreground class
    teacher[:, 1, 4:] = -10.0  # rows 4-5: label and teacher background
    student = torch.randn(1, 4, 6, 6, generator=generator).requires_grad_(True)
    loss(student, teacher, label).backward()
    touched = student.grad.abs().sum(1)[0] > 0
    return loss, touched, label[0, 0] == 0


def test_foreground_filtering_drops_the_voxels_the_teacher_calls_local_foreground():
    _, touched, _ = _condist_case(True)
    assert not touched[:4].any() and touched[4:].all()  # label foreground and teacher foreground both left out
    _, touched, background = _condist_case(False)
    assert torch.equal(touched, background)  # without it: every voxel the local label calls background


def test_background_grouping_by_organ_or_by_class():
    organ, _, _ = _condist_case(True, "organ")
    per_class, _, _ = _condist_case(True, "class")
    assert organ.num_groups == 3 and per_class.num_groups == 3  # [bg], [tumour], [other] either way here
    labels = LabelSpace(tuple(["background", "liver", "liver_tumor", "spleen"]), {"liver_tumor": "liver"})
    assert labels.background_groups([3], "organ") == [[0], [1, 2]]
    assert labels.background_groups([3], "class") == [[0], [1], [2]]


def test_method_switches_reach_the_site(smoke_config_path):
    cfg = load_config(
        smoke_config_path,
        [
            "method.temperature=4.0",
            "method.ce=marginal",
            "method.foreground_filter=false",
            "method.background_groups=class",
        ],
    )
    site, _ = _objective(cfg, [1, 2])  # liver and its tumour: by class, background and the other 5 classes apart
    assert site.teacher_loss.temperature == 4.0 and not site.teacher_loss.foreground_filter
    assert site.teacher_loss.num_groups == 6 and site.supervised_losses[0].ce == "marginal"
    site, _ = _objective(load_config(smoke_config_path), [1, 2])
    assert site.teacher_loss.num_groups == 4  # background, spleen, pancreas + tumour, kidney + tumour
    for method, loss in (("kd", KDLoss), ("pseudo_label", PseudoLabelLoss), ("fedopt", type(None))):
        site, _ = _objective(load_config(smoke_config_path, [f"method={method}", "method.temperature=3.0"]), [1, 2])
        assert type(site.teacher_loss) is loss and site.teacher_term_name == ("" if method == "fedopt" else method)
    assert site.teacher_loss is None


def test_the_teacher_term_starts_at_its_start_round_and_then_rises_to_the_last():
    method = OmegaConf.structured(MethodConfig(condist_start_round=3))
    weights = [condist_weight(method, r, 7) for r in range(1, 8)]  # rounds 1 to 7
    assert weights[:2] == [0.0, 0.0] and weights[2] == pytest.approx(0.01) and weights[-1] == pytest.approx(1.0)
    assert weights[2:] == pytest.approx([0.01 + r * 0.99 / 4 for r in range(5)])
    assert condist_weight(OmegaConf.structured(MethodConfig(condist_start_round=4)), 4, 4) == pytest.approx(0.01)


def test_before_its_start_round_no_teacher_term_is_computed(smoke_config_path):
    cfg = load_config(smoke_config_path, ["method.condist_start_round=2", "model.channels_last=false"])
    site, _, module, batch = _set_up_with_a_batch(cfg)
    calls = []
    site.teacher.register_forward_hook(lambda *_: calls.append(1))
    logged = []
    site.log_dict = logged.append  # the metrics of each step
    for round in (1, 2):
        site.receive(site.teacher.state_dict(), round)
        module.training_step(batch, 0)
    assert len(calls) == 1 and "condist" not in logged[0] and logged[1]["condist_weight"] == pytest.approx(0.01)


def test_a_constant_condist_weight_is_a_schedule_that_starts_where_it_ends():
    method = OmegaConf.structured(MethodConfig(condist_weight_start=0.5, condist_weight_end=0.5))
    assert [condist_weight(method, r, 6) for r in range(1, 7)] == [0.5] * 6


@pytest.mark.parametrize("sources", [1, 2])
def test_warm_up_rises_linearly_over_the_first_rounds_then_decays_by_cosine(smoke_config_path, sources):
    """A pooled client (two sources taking turns) warms up over the same rounds as a site."""
    cfg = load_config(smoke_config_path, ["fl.rounds=4", "fl.local_steps=5", "optim.warmup_rounds=1", "optim.lr=0.2"])
    run = build_run(cfg)
    objective = run.objective([[1]] * sources, run.new_network())
    schedule = objective.configure_optimizers()
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(objective.total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = 5 * sources  # one round's local steps
    assert rates[:warmup] == pytest.approx([0.2 * (i + 1) / (warmup + 1) for i in range(warmup)])
    decay = objective.total_steps - warmup
    cosine = [1e-7 + (0.2 - 1e-7) * (1 + math.cos(math.pi * i / decay)) / 2 for i in range(decay)]
    assert rates[warmup:] == pytest.approx(cosine)
