"""Configs compose, resolve and validate; every mistake names the key or class."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_fl.config import CONFIG_DIR, ConfigError, check_size, file_holds, load_config, with_overrides
from lightning_fl.networks import build_network


@pytest.mark.parametrize(
    "name", ["demo", "condistfl_synthetic", "condistfl_paper", "smoke", "smoke_2d", "testbed", "testbed_3d"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.labels.classes[0] == "background" and len(cfg.data.sites) == 4


def test_default_config_is_the_demo_the_testbed_s_condistfl_cut_to_24_rounds():
    demo, testbed = load_config(), load_config(CONFIG_DIR / "testbed.yaml")
    assert demo.output_dir == "runs/demo" and demo.method == testbed.method and demo.fl.rounds == 24
    assert demo.model == testbed.model and demo.data == testbed.data and demo.optim == testbed.optim


def test_paper_config_has_the_spec_values():
    cfg = load_config(CONFIG_DIR / "condistfl_paper.yaml")
    assert (cfg.fl.rounds, cfg.fl.local_steps, cfg.fl.aggregation) == (120, 1000, "fedopt")
    assert (cfg.fl.server_lr, cfg.fl.server_lr_min, cfg.fl.server_momentum) == (1.0, 0.9, 0.6)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.grad_clip_norm) == (
        0.01,
        0.99,
        1e-5,
        1.0,
    )
    assert list(cfg.data.patch_size) == [224, 224, 64] and cfg.method.temperature == 2.0
    assert list(cfg.model.filters) == [32, 64, 128, 256, 320, 320]
    net = build_network(cfg.model, 1, len(cfg.labels.classes))
    assert len(net.deep_supervision_heads) == 3


def test_overrides_reach_nested_keys_and_list_items():
    cfg = load_config(
        CONFIG_DIR / "smoke.yaml", ["fl.rounds=5", "data.sites.1.classes=[spleen]", "method.condist=false"]
    )
    assert cfg.fl.rounds == 5 and cfg.method.condist is False


@pytest.mark.parametrize(
    "override,message",
    [
        ("fl.roundz=3", "Key 'roundz' not in"),
        ("trainer.max_epochs=3", "Key 'trainer' not in"),
        ("fl.rounds=many", "could not be converted to Integer"),
        ("fl.rounds=0", "fl.rounds: expected a value ≥ 1, got 0"),
        ("method.ce=focal", "method.ce: expected one of"),
        ("method.temperature=0", "method.temperature: expected a value > 0, got 0"),
        ("data.sites.0.classes=[liver,livr]", "site 'liver' .*unknown class 'livr'"),
        ("data.sites.2.classes=[]", "site 'pancreas' .*at least one class"),
        ("fl.rounds", "not of the form dotted.key=value"),
        ("fabric.devices=0", "fabric.devices: expected a whole number ≥ 1 or 'auto', got 0"),
        ("fabric.devices=two", "fabric.devices: expected a whole number ≥ 1 or 'auto', got 'two'"),
        ("data.synthetic.scanners.unenhanced.phase=arterial", "scanners.unenhanced.phase: expected one of"),
        ("eval.every=0", "eval.every: expected a value ≥ 1, got 0"),
        ("data.crop=random", "data.crop: expected one of"),
        ("data.intensity.hu_min=300", r"data.intensity: expected hu_min < hu_max, got 300.0 and 258.0"),
        ("data.pos_neg_ratio=[0,0]", r"data.pos_neg_ratio: expected at least one of the two weights > 0"),
        (
            "data.synthetic.scanners.liver.train=0",
            r"data.synthetic.scanners.liver: train must be ≥ 1 for this site, got 0",
        ),
        (
            "model.filters=[8,16,32]",
            r"model.kernel_size, model.strides and model.filters need one entry per level, got 4, 4 and 3",
        ),
        ("model.deep_supervision_heads=3", r"model.deep_supervision_heads must lie in \[0, 2\] for 4 levels, got 3"),
        ("model.strides=[[1,1,1],[2,2],[2,2,2],[2,2,2]]", r"expected 3 values \(x, y, z\) per level"),
        (
            "data.augmentation.zoom_range=[1.4,0.7]",
            r"zoom_range: expected a range \[low, high\] with low ≤ high, got \[1.4, 0.7\]",
        ),
        ("eval.roi_size=[24,24]", r"eval.roi_size=\[24, 24\]: the model is 3D \(model.strides\), so expected 3 values"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "smoke.yaml", [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [condistfl_synthetic]\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'optim.learning_rate'"):
        load_config(bad)


def test_missing_file_and_bad_defaults(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [no/such/file]\n")
    with pytest.raises(ConfigError, match="config file not found: .*no/such/file.yaml"):
        load_config(bad)


@pytest.mark.parametrize("name", ["fedavg_synthetic", "fedopt_synthetic"])
def test_experiment_configs_are_the_demo_without_distillation(name):
    cfg = load_config(CONFIG_DIR.parent / "experiments" / f"{name}.yaml")
    demo = load_config(CONFIG_DIR / "condistfl_synthetic.yaml")
    assert cfg.method.condist is False and cfg.fl.aggregation == name.split("_")[0]
    assert cfg.data == demo.data and cfg.model == demo.model and cfg.optim == demo.optim


def test_patch_sizes_the_network_cannot_take_are_config_errors():
    model = load_config(CONFIG_DIR / "condistfl_paper.yaml").model  # strides multiply to [32, 32, 16]
    check_size(model, [224, 224, 64], "data.patch_size")
    with pytest.raises(ConfigError, match=r"data.patch_size=\[100, 224, 64\] must be a multiple of \[32, 32, 16\]"):
        check_size(model, [100, 224, 64], "data.patch_size")
    with pytest.raises(
        ConfigError, match=r"eval.roi_size=\[32, 32, 16\] leaves one voxel at the network's deepest level"
    ):
        check_size(model, [32, 32, 16], "eval.roi_size")


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data.patch_size=[32,32,32]",
            r"data.patch_size=\[32, 32, 32\]: the model is 2D \(model.strides\), so expected 2",
        ),
        ("eval.roi_size=[32]", r"eval.roi_size=\[32\]: the model is 2D .* expected 2 values \(x, y: an axial slice\)"),
        ("data.spacing_mm=[8,8,8]", r"a 2D model trains on axial slices resampled in plane only, so the third value"),
        ("data.spacing_mm=[0,8,0]", r"data.spacing_mm=\[0.0, 8.0, 0.0\]: the in-plane spacing \(x, y\) must be > 0"),
        ("model.strides=[[1,1],[2,2,2],[2,2],[2,2],[2,2]]", r"expected 3 values \(x, y, z\) per level .* or 2"),
        (
            "data.class_ratios={kidney: 2}",
            r"data.class_ratios sets shares of data.crop=classes, but data.crop is pos_neg",
        ),
        (
            "data.class_ratios={kidny: 2}",
            r"data.class_ratios names \['kidny'\], which are not classes of labels.classes",
        ),
    ],
)
def test_2d_geometry_mistakes_are_config_errors(override, message):
    """A 2D model (configs/smoke_2d.yaml) states the dimensionality; every size must agree with it."""
    overrides = [override] + (["data.crop=classes"] if "kidny" in override else [])
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "smoke_2d.yaml", overrides)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-0.1", r"optim.lr: expected a value > 0, got -0.1"),
        ("optim.lr=0", r"optim.lr: expected a value > 0, got 0"),
        ("optim.momentum=-1", r"optim.momentum: expected a value ≥ 0 and < 1, got -1"),
        ("optim.lr=.nan", r"optim.lr: expected a value that is finite, got nan"),
        ("optim.momentum=0", r"optim.nesterov=true needs optim.momentum > 0"),
        ("optim.warmup_rounds=2", r"optim.warmup_rounds must be < fl.rounds \(2\).*got 2"),
        ("optim.warmup_rounds=-1", r"optim.warmup_rounds: expected a value ≥ 0, got -1"),
    ],
)
def test_impossible_optimizer_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "smoke.yaml", [override])


def test_float16_autocast_off_a_gpu_runs_and_is_recorded_as_autos_choice(capsys):
    """Lightning runs bf16 where 16-mixed is asked on a CPU: the config (saved with the run, and the
    summary's precision) says what ran, not what was asked."""
    from lightning_fl import distributed

    cfg = load_config(CONFIG_DIR / "smoke.yaml", ["fabric.accelerator=cpu", "fabric.precision=16-mixed"])
    auto = distributed.resolve_precision(OmegaConf.merge(cfg.fabric, {"precision": "auto"}))
    fabric = distributed.build_fabric(cfg)
    assert cfg.fabric.precision == auto and auto in ("bf16-mixed", "32-true")
    assert fabric.strategy.precision.precision == auto  # what Fabric runs
    assert f"fabric.precision=16-mixed needs a GPU; running (and recording) {auto}" in capsys.readouterr().out


def test_auto_devices_is_a_process_per_client_up_to_the_cores(monkeypatch):
    from lightning_fl import distributed

    for method, clients in (("condistfl", 4), ("standalone", 4), ("centralized", 1)):
        cfg = load_config(CONFIG_DIR / "condistfl_synthetic.yaml", ["fabric.accelerator=cpu", f"method={method}"])
        assert cfg.fabric.devices == "auto"
        for cores in (1, 2, 16):
            monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
            assert distributed.build_fabric(cfg.copy()).world_size == min(cores, clients)
    cfg.fabric.devices = 3
    assert distributed.resolve_devices(cfg.fabric, 4) == 3


def test_a_model_saved_with_one_external_site_still_loads():
    from omegaconf import OmegaConf

    from lightning_fl.config import config_from_container

    saved = OmegaConf.to_container(load_config(CONFIG_DIR / "condistfl_paper.yaml"), resolve=True)
    saved["data"]["external"] = {
        "name": "amos",
        "datalist": "amos.json",
        "classes": ["liver", "spleen", "pancreas", "kidney"],
    }
    cfg = config_from_container(saved, None, "old.ckpt")
    assert [s.name for s in cfg.data.external] == ["amos"]
    saved["data"]["external"] = None
    assert list(config_from_container(saved, None, "old.ckpt").data.external) == []


def test_augmented_experiment_is_the_demo_with_the_papers_augmentation():
    from lightning_fl.config import AugmentationConfig

    cfg = load_config(CONFIG_DIR.parent / "experiments" / "augmented_synthetic.yaml")
    demo = load_config(CONFIG_DIR / "condistfl_synthetic.yaml")
    assert cfg.data.augmentation == OmegaConf.structured(AugmentationConfig)  # the schema holds the paper's values
    assert all(v == 0 for k, v in demo.data.augmentation.items() if k.endswith("_prob"))
    assert cfg.model == demo.model and cfg.fl == demo.fl and cfg.optim == demo.optim


# ---------------------------------------------------------------- the method config group
METHODS = ("condistfl", "fedavg", "fedopt", "fedprox", "standalone", "centralized")


@pytest.mark.parametrize("name", METHODS)
def test_a_method_is_chosen_on_the_command_line(smoke_config_path, name):
    cfg = load_config(smoke_config_path, [f"method={name}"])
    expected = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
    assert OmegaConf.to_container(cfg.method) | OmegaConf.to_container(expected.method) == OmegaConf.to_container(
        cfg.method
    )
    assert cfg.fl.aggregation == OmegaConf.select(
        expected, "fl.aggregation", default="fedopt"
    )  # a method file states only its departures


def test_a_group_choice_replaces_the_files_choice_and_keys_override_it(smoke_config_path):
    """As in Hydra: `method=` replaces the defaults entry, so the file's own keys and dotted
    overrides still apply after it."""
    cfg = load_config(CONFIG_DIR.parent / "experiments" / "fedopt_synthetic.yaml", ["method=condistfl"])
    assert cfg.method.condist and cfg.output_dir == "runs/fedopt_synthetic"
    cfg = load_config(smoke_config_path, ["method.proximal_mu=0.5", "method=fedprox", "fl.aggregation=fedopt"])
    assert cfg.method.proximal_mu == 0.5 and cfg.fl.aggregation == "fedopt"


def test_group_choice_mistakes_are_named(smoke_config_path):
    with pytest.raises(
        ConfigError,
        match=r"override 'method=fedsgd': .*method has no fedsgd.yaml; choose one of "
        r"\['centralized', 'condistfl', 'fedavg', 'fedopt', 'fedprox', 'kd', 'pseudo_label', 'standalone'\]",
    ):
        load_config(smoke_config_path, ["method=fedsgd"])
    with pytest.raises(ConfigError, match="method.training=standalone has no global model for method.condist to use"):
        load_config(smoke_config_path, ["method=standalone", "method.condist=true"])
    with pytest.raises(ConfigError, match="method.training=centralized has no global model for method.kd to use"):
        load_config(smoke_config_path, ["method=centralized", "method.kd=true"])
    with pytest.raises(ConfigError, match="method.condist and method.pseudo_label are both on; choose one"):
        load_config(smoke_config_path, ["method.pseudo_label=true"])
    with pytest.raises(ConfigError, match=r"method.condist_start_round must be ≤ fl.rounds \(2\), got 3"):
        load_config(smoke_config_path, ["method.condist_start_round=3"])
    with pytest.raises(ConfigError, match="fl.aggregation must be fedavg, got fedopt"):
        load_config(smoke_config_path, ["method=centralized", "fl.aggregation=fedopt"])
    with pytest.raises(ConfigError, match="is already composed: override its keys instead"):
        with_overrides(load_config(smoke_config_path), ["method=fedavg"])


def test_a_saved_config_read_plainly_is_the_loaded_one_or_undecided(tmp_path: Path):
    """`file_holds` answers True only where loading the file gives the config but for the keys it
    ignores: the file as a run saves it, without a key at its default, with a key's old name, an int
    for a float. Where a value differs, a key off its default is left out, a key is unknown, a bool
    stands for a number, a float for an int or a section is null, it answers False (loading the
    file decides)."""
    cfg = load_config(CONFIG_DIR / "testbed.yaml", ["output_dir=runs/x"])
    path = tmp_path / "config.yaml"

    def holds(edit: Callable[[dict], object] = lambda c: None, ignore: tuple[str, ...] = ()) -> bool:
        content = OmegaConf.to_container(cfg, resolve=True)
        edit(content)
        path.write_text(yaml.safe_dump(content))
        return file_holds(path, cfg, ignore)

    assert holds() and load_config(path) == cfg
    assert holds(lambda c: c["method"].pop("condist_start_round"))  # 1, the schema's default
    assert holds(lambda c: c["fl"].__setitem__("strategy", c["fl"].pop("aggregation")))  # its old name
    assert holds(lambda c: c["fl"].__setitem__("server_lr", 1))  # a float key given an int: 1.0
    assert not holds(lambda c: c.__setitem__("seed", 1))
    assert holds(lambda c: c.__setitem__("seed", 1), ignore=("seed",))
    assert not holds(lambda c: c["fl"].pop("rounds"))  # 48, the schema's 120
    assert not holds(lambda c: c["fl"].__setitem__("nonsense", 1))
    assert not holds(lambda c: c["fl"].__setitem__("min_sites", True))  # 1 in the config
    assert not holds(lambda c: c["fl"].__setitem__("rounds", 48.0))  # an int key given a float: refused
    assert not holds(lambda c: c["data"].__setitem__("synthetic", None))
    path.write_text("- a list\n")
    assert not file_holds(path, cfg) and not file_holds(tmp_path / "absent.yaml", cfg)
