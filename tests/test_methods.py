"""What makes each method itself: the config group that selects it, FedProx's proximal gradient,
standalone sites that never aggregate, centralized training on every site's labels, and each
ConDist switch."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import make_site
from omegaconf import OmegaConf

from lightning_fl.config import CONFIG_DIR, ConfigError, MethodConfig, load_config, with_overrides
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.labels import label_space_from_config
from lightning_fl.losses import ConDistDiceLoss
from lightning_fl.site import Site, condist_weight

METHODS = ("condistfl", "fedavg", "fedopt", "fedprox", "standalone", "centralized")
QUIET = ["logger.wandb.mode=disabled", "fl.local_steps=1", "fl.rounds=1"]


# ---------------------------------------------------------------- the config group
@pytest.mark.parametrize("name", METHODS)
def test_a_method_is_chosen_on_the_command_line(smoke_config_path, name):
    cfg = load_config(smoke_config_path, [f"method={name}"])
    expected = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
    assert OmegaConf.to_container(cfg.method) | OmegaConf.to_container(expected.method) == OmegaConf.to_container(
        cfg.method
    )
    assert cfg.fl.strategy == OmegaConf.select(
        expected, "fl.strategy", default="fedopt"
    )  # a method file states only its departures


def test_a_group_choice_replaces_the_files_choice_and_keys_override_it(smoke_config_path):
    """As in Hydra: `method=` replaces the defaults entry, so the file's own keys and dotted
    overrides still apply after it."""
    cfg = load_config(CONFIG_DIR.parent / "experiments" / "fedopt_synthetic.yaml", ["method=condistfl"])
    assert cfg.method.condist and cfg.output_dir == "runs/fedopt_synthetic"
    cfg = load_config(smoke_config_path, ["method.proximal_mu=0.5", "method=fedprox", "fl.strategy=fedopt"])
    assert cfg.method.proximal_mu == 0.5 and cfg.fl.strategy == "fedopt"


def test_group_choice_mistakes_are_named(smoke_config_path):
    with pytest.raises(
        ConfigError,
        match=r"override 'method=fedsgd': .*method has no fedsgd.yaml; choose one of "
        r"\['centralized', 'condistfl', 'fedavg', 'fedopt', 'fedprox', 'standalone'\]",
    ):
        load_config(smoke_config_path, ["method=fedsgd"])
    with pytest.raises(ConfigError, match="method.training=standalone has no global model for method.condist to use"):
        load_config(smoke_config_path, ["method=standalone", "method.condist=true"])
    with pytest.raises(ConfigError, match="fl.strategy must be fedavg, got fedopt"):
        load_config(smoke_config_path, ["method=centralized", "fl.strategy=fedopt"])
    with pytest.raises(ConfigError, match="is already composed: override its keys instead"):
        with_overrides(load_config(smoke_config_path), ["method=fedavg"])


# ---------------------------------------------------------------- FedProx
def _site(cfg, foreground: list[int]) -> tuple[Site, L.Fabric]:
    return make_site(cfg, foreground), L.Fabric(accelerator="cpu", devices=1, precision="32-true")


def test_fedprox_adds_mu_times_the_distance_to_the_global_model_to_the_gradient(smoke_config_path):
    grads, sites = {}, {}
    for mu in (0.0, 0.3):
        cfg = load_config(
            smoke_config_path, ["method=fedprox", f"method.proximal_mu={mu}", "model.channels_last=false"]
        )
        site, fabric = _site(cfg, [1, 2])
        module, _ = fabric.setup(site, site.configure_optimizers()["optimizer"])
        generator = torch.Generator().manual_seed(1)
        batch = {
            "image": torch.randn(1, 1, *cfg.data.patch_size, generator=generator),
            "label": torch.randint(0, 3, (1, 1, *cfg.data.patch_size), generator=generator),
        }
        site.receive(site.teacher.state_dict(), 0)
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


# ---------------------------------------------------------------- standalone and centralized
def _record_batches(federation: Federation) -> dict[str, list[tuple[str, int, list[int]]]]:
    """Per client, (case file, source index, label values) of every batch it trains on."""
    seen: dict[str, list] = {name: [] for name in federation.clients}
    for name, client in federation.clients.items():
        for index, (_, stream) in enumerate(client.sources):

            def start_round(*args, _start=stream.start_round, _name=name, _index=index):
                for batch in _start(*args):
                    for path, label in zip(batch["image"].meta["filename_or_obj"], batch["label"]):
                        seen[_name].append((path, _index, sorted(int(v) for v in label.unique())))
                    yield batch

            stream.start_round = start_round
    return seen


def _training_files(federation: Federation, site: str) -> set[str]:
    return {item["image"] for item in federation.site_data[site].splits["training"]}


def test_standalone_sites_never_aggregate_and_train_on_their_own_cases(data_home, smoke_config_path, tmp_path):
    cfg = load_config(
        smoke_config_path, ["method=standalone", f"output_dir={tmp_path / 'standalone'}", *QUIET, "fl.local_steps=2"]
    )
    federation = Federation(cfg, build_fabric(cfg))
    seen = _record_batches(federation)
    initial = {k: v.clone() for k, v in federation.models["liver"].items()}
    summary = federation.fit()
    sites = list(federation.site_data)
    assert federation.topology.models == sites
    for site in sites:
        assert [s for s, _ in federation.clients[site].sources] == [site]
        assert {path for path, _, _ in seen[site]} <= _training_files(federation, site) and len(seen[site]) == 2
    # each model moved by its own site's update alone: exactly the model of a one-site federation
    one = load_config(
        smoke_config_path,
        [
            "data.synthetic=null",
            f"data.root={data_home / 'synthetic-smoke'}",
            "data.external=[]",
            "method=fedavg",
            "data.sites=[{name: liver, datalist: liver.json, classes: [liver, liver_tumor]}]",
            f"output_dir={tmp_path / 'one_site'}",
            *QUIET,
            "fl.local_steps=2",
        ],
    )
    alone = Federation(one, build_fabric(one))
    alone.fit()
    for key, value in federation.models["liver"].items():
        assert torch.equal(value, alone.models["global"][key]), key
    assert any(not torch.equal(federation.models["liver"][k], federation.models["spleen"][k]) for k in initial)
    # every site's model on every site: a site's model cannot segment what its site never labelled
    assert set(summary["cross_site"]) == set(sites)
    assert all(set(per_site) == set(sites) | set(federation.external) for per_site in summary["cross_site"].values())
    rows = list(csv.DictReader((tmp_path / "standalone" / "test_cases.csv").open()))
    assert {(r["model"], r["site"]) for r in rows} == {(m, s) for m in sites for s in sites + list(federation.external)}
    assert all((tmp_path / "standalone" / f"best_{site}.ckpt").is_file() for site in sites)


def test_centralized_training_sees_every_sites_cases_with_that_sites_labels(data_home, smoke_config_path, tmp_path):
    cfg = load_config(smoke_config_path, ["method=centralized", f"output_dir={tmp_path}", *QUIET])
    federation = Federation(cfg, build_fabric(cfg))
    seen = _record_batches(federation)
    sources = [name for name, _ in federation.clients["pooled"].sources]
    federation.fit()
    assert list(federation.clients) == ["pooled"] and sources == list(federation.site_data)
    steps = seen["pooled"]
    assert [index for _, index, _ in steps] == [0, 1, 2, 3]  # the sites take turns, one batch each
    site = federation.clients["pooled"].site
    for path, index, values in steps:
        data = federation.site_data[sources[index]]
        assert path in _training_files(federation, data.name)
        assert set(values) <= {0, *data.foreground}  # each case carries only its site's annotation
        assert site.supervised_losses[index].foreground == data.foreground  # and is supervised by it
    assert federation.clients["pooled"].scheduler.T_max == cfg.fl.rounds * 4 * cfg.fl.local_steps


# ---------------------------------------------------------------- ConDist's switches
def _condist_case(filter_foreground: bool, by: str = "organ"):
    """A site labelling class 1 of classes [bg, organ, its tumour, other]; the teacher calls some
    label-background voxels class 1."""
    labels = label_space_from_config(["background", "organ", "organ_tumor", "other"], {"organ_tumor": "organ"})
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
    labels = label_space_from_config(["background", "liver", "liver_tumor", "spleen"], {"liver_tumor": "liver"})
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
    site, _ = _site(cfg, [1, 2])  # liver and its tumour: by class, background and the other 5 classes apart
    assert site.condist_loss.temperature == 4.0 and not site.condist_loss.foreground_filter
    assert site.condist_loss.num_groups == 6 and site.supervised_losses[0].ce == "marginal"
    site, _ = _site(load_config(smoke_config_path), [1, 2])
    assert site.condist_loss.num_groups == 4  # background, spleen, pancreas + tumour, kidney + tumour


def test_a_constant_condist_weight_is_a_schedule_that_starts_where_it_ends():
    method = OmegaConf.structured(MethodConfig(condist_weight_start=0.5, condist_weight_end=0.5))
    assert [condist_weight(method, r, 6) for r in range(6)] == [0.5] * 6
