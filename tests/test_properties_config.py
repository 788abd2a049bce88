"""Property-based tests of the config schema (Hypothesis): any value for any key either loads, and
then the code that takes it runs, or is refused as the config loads, with one line that names the
key. Nothing is left to fail an hour into a run."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lightning_fl import config as schema
from lightning_fl.aggregation import build_aggregator
from lightning_fl.config import CONFIG_DIR, ConfigError, Rule, load_config, with_overrides
from lightning_fl.data.transforms import training_transform
from lightning_fl.inference import sliding_logits
from lightning_fl.labels import LabelSpace
from lightning_fl.sweep_plan import load_sweep, plan_runs
from tests.helpers.runs import make_objective

SMOKE = CONFIG_DIR / "smoke.yaml"
BASE = load_config(SMOKE)  # composed once; each example overrides one key of it
EXAMPLES = settings(derandomize=True, deadline=None, max_examples=120, suppress_health_check=list(HealthCheck))
SMALL = 64  # values are exercised beyond loading only up to this size (larger ones: memory, not correctness)


def _leaves(cls: type, prefix: str) -> list[tuple[str, Any, Rule]]:
    """(dotted key, annotated type, rule) of every number, flag, choice and list of numbers in the
    schema; sites and scanners through their first entry. Names, paths and class lists are left to
    the label-space and datalist tests."""
    hints = typing.get_type_hints(cls, vars(schema))
    found = []
    for spec in dataclasses.fields(cls):
        kind, key = hints[spec.name], f"{prefix}{spec.name}"
        inner = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            found += _leaves(kind, f"{key}.")
        elif typing.get_origin(kind) is typing.Union and dataclasses.is_dataclass(inner[0]):
            found += _leaves(inner[0], f"{key}.")
        elif typing.get_origin(kind) is list and inner and dataclasses.is_dataclass(inner[0]):
            found += _leaves(inner[0], f"{key}.0.")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(inner[1]):
            found += _leaves(inner[1], f"{key}.liver.")
        elif (
            kind in (int, float, bool, Any)
            or (kind is str and spec.metadata.get("rule"))
            or typing.get_origin(kind) is list
            and inner[0] is not str
        ):
            found.append((key, kind, spec.metadata.get("rule", Rule())))
    return found


KEYS = _leaves(schema.RunConfig, "")


def _values(kind: Any, rule: Rule) -> st.SearchStrategy:
    """Values near the rule's bounds half of the time (so the code that takes them runs), anything
    (huge, non-finite, the wrong type) the other half."""
    wide = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True))
    junk = st.one_of(st.text(max_size=6), st.booleans(), st.none(), wide)

    def near(of: Any) -> st.SearchStrategy:
        return st.integers(-1, 8) if of is int else st.one_of(st.floats(-0.5, 2.5), st.integers(0, 8))

    if kind is str:
        return st.one_of(st.sampled_from(rule.choices or ("x",)), junk)
    if kind is bool:
        return st.one_of(st.booleans(), junk)
    if typing.get_origin(kind) is list:
        levels = len(BASE.model.strides)
        if typing.get_args(kind)[0] == list[int]:  # kernel sizes and strides: a triple per level
            item, size = st.lists(st.integers(1, 3), min_size=3, max_size=3), levels
        else:
            item = st.integers(1, SMALL) if typing.get_args(kind)[0] is int else near(float)
            size = rule.length or levels
        exact, off = st.lists(item, min_size=size, max_size=size), st.lists(item, min_size=size - 1, max_size=size + 1)
        return st.one_of(exact, exact, off, st.lists(wide, max_size=4), junk)
    return st.one_of(near(kind), near(kind), junk)


def _yaml(value: Any) -> str:
    """The override text that YAML reads back as `value`."""
    if isinstance(value, list):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


@st.composite
def overrides(draw: st.DrawFn) -> tuple[str, str]:
    key, kind, rule = draw(st.sampled_from(KEYS))
    return key, f"{key}={_yaml(draw(_values(kind, rule)))}"


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 40 × 36 × 30 CT-like volume on the smoke grid (8 mm) with a liver and a tumour label."""
    folder = tmp_path_factory.mktemp("tiny_case")
    rng = np.random.default_rng(0)
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    image = rng.normal(40, 30, (40, 36, 30)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[10:30, 8:28, 6:24] = 1
    label[16:22, 14:20, 12:18] = 2
    paths = {"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz")}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return paths


def _small(value: Any) -> bool:
    return all(abs(v) <= SMALL for v in np.ravel(np.asarray(value, dtype=object)) if isinstance(v, (int, float)))


def _exercise(cfg: Any, key: str, case: dict[str, str]) -> str:
    """Run the code that consumes `key`'s section, on tiny inputs; say which."""
    labels = LabelSpace.of(cfg.labels)
    if key.startswith("data.") and not key.startswith(
        ("data.root", "data.spacing_mm", "data.synthetic", "data.cache", "data.num_workers", "data.check")
    ):
        foreground = labels.foreground(cfg.data.sites[0].classes)
        patches = training_transform(cfg.data, [0, *foreground], cfg.labels.classes)(dict(case))
        assert len(patches) == cfg.data.samples_per_volume
        assert all(tuple(p["image"].shape[1:]) == tuple(cfg.data.patch_size) for p in patches)
        return "training transform"
    elif key.startswith("eval."):
        logits = sliding_logits(lambda x: torch.cat([x, -x], 1), torch.randn(1, 1, 40, 36, 30), cfg.eval)
        assert logits.shape == (1, 2, 40, 36, 30) and torch.isfinite(logits).all()
        return "sliding window"
    elif key.startswith("fl."):
        state = {"w": torch.zeros(3)}
        aggregator = build_aggregator(cfg.fl, state)
        new = aggregator.aggregate(state, [{"w": torch.ones(3)}], [1.0])
        assert torch.isfinite(new["w"]).all()
        return "aggregation"
    elif key.startswith(("model.", "optim.", "method.")):
        fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
        foreground = labels.foreground(cfg.data.sites[0].classes)
        objective = make_objective(cfg, foreground)
        optimizers = objective.configure_optimizers()
        module, optimizer = fabric.setup(objective, optimizers["optimizer"])
        batch = {
            "image": torch.randn(1, 1, *cfg.data.patch_size),
            "label": torch.randint(0, 2, (1, 1, *cfg.data.patch_size)) * foreground[0],
        }
        if cfg.model.channels_last:
            batch["image"] = batch["image"].to(memory_format=torch.channels_last_3d)
        loss = module.training_step(batch, 0)
        fabric.backward(loss)
        optimizer.step()
        optimizers["lr_scheduler"]["scheduler"].step()
        assert torch.isfinite(loss)
        return "training step"
    return "nothing (load only)"


VALID = ("data.patch_size", "data.patch_size=[16,16,16]")  # keeps every rule: it must load and run


@given(drawn=overrides())
@example(drawn=VALID)
@EXAMPLES
def test_any_value_of_any_key_loads_and_runs_or_is_refused_naming_the_key(drawn, tiny_case, data_home):
    key, override = drawn
    try:
        cfg = with_overrides(BASE, [override])
    except ConfigError as err:
        message = str(err)
        assert drawn != VALID, message
        assert "\n" not in message, message
        assert key.rsplit(".", 1)[-1] in message, f"{override!r} refused without naming the key: {message}"
        event("refused")
        return
    value = cfg
    for part in key.split("."):
        value = value[int(part)] if part.isdigit() else value[part]
    if _small(value):
        event(f"loaded, then ran: {_exercise(cfg, key, tiny_case)}")


CROSS_KEY_RULES = (
    "must be a multiple",
    "leaves one voxel",
    "one entry per level",
    "3 values (x, y, z)",
    "deep_supervision_heads must lie",
    "min_sites must lie",
    "nesterov",
    "hu_min < hu_max",
    "pos_neg_ratio: expected at least one",
    "must be ≥ 1 for this site",
    "expected odd sizes",
    "has no global model for",
    "choose one teacher term",
    "the in-plane spacing (x, y) must be > 0",  # spacing_mm's rule allows 0, for the 2D slice axis only
    "condist_start_round must be",
    "fl.aggregation must be fedavg",
    "trains one pooled model",
)


def _of_type(value: Any, kind: Any) -> bool:
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_of_type(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return kind is Any or isinstance(value, kind)


@given(drawn=overrides())
@example(drawn=VALID)
@EXAMPLES
def test_a_value_is_refused_exactly_when_it_breaks_a_declared_rule(drawn):
    """A value of the key's type that breaks the rule declared beside the key is always refused; one
    that keeps it is refused only by a stated rule tying it to other keys (sizes against strides,
    levels, [low, high] windows, counts)."""
    key, override = drawn
    _, kind, rule = next(k for k in KEYS if k[0] == key)
    value = yaml.safe_load(override.partition("=")[2])
    if not _of_type(value, kind) or kind is Any:
        return  # the schema's type check, or fabric.devices' own rule (tested in test_config.py)
    try:
        with_overrides(BASE, [override])
    except ConfigError as err:
        if rule.problem(value) is None:
            assert any(c in str(err) for c in CROSS_KEY_RULES), f"{override!r} keeps its rule but was refused: {err}"
        return
    assert rule.problem(value) is None, f"{override!r} breaks its rule ({rule.problem(value)}) but loaded"


def test_the_fifteen_impossible_values_are_refused_at_once_before_any_work(tmp_path, capsys, monkeypatch):
    """Issue 11: these passed `check-data` ("data OK"), and `eval.overlap=1.0` trained a whole round
    before a MONAI traceback."""
    from lightning_fl.cli import main

    monkeypatch.setenv("LIGHTNING_FL_DATA", str(tmp_path / "data"))
    impossible = [
        "fl.server_lr=-1",
        "eval.overlap=1.5",
        "data.batch_size=0",
        "data.spacing_mm=[-1,-1,-1]",
        "data.intensity.scale=0",
        "fl.server_momentum=1.5",
        "data.cache_rate=2",
        "data.augmentation.flip_prob=-0.1",
        "eval.sw_batch_size=0",
        "data.samples_per_volume=0",
        "optim.weight_decay=-1",
        "data.num_workers=-1",
        "method.condist_weight_end=-1",
        "seed=-1",
        "data.synthetic.incidental_tumor_probability=1.5",
    ]
    assert main(["check-data", "--config", str(SMOKE), *impossible]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    for item in impossible:
        assert f"{item.split('=')[0]}:" in message, item
    assert not (tmp_path / "data").exists()  # nothing generated, nothing read
    out = tmp_path / "run"
    assert main(["fit", "--config", str(SMOKE), f"output_dir={out}", "eval.overlap=1.0"]) == 2
    assert "eval.overlap: expected a value ≥ 0 and < 1, got 1.0" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_every_schema_key_with_a_range_declares_it_beside_the_key():
    """The rules are data in the schema, not code elsewhere: every probability is declared in [0, 1]."""
    probabilities = [(key, rule) for key, _, rule in KEYS if key.endswith(("_prob", "probability", "cache_rate"))]
    assert len(probabilities) >= 12
    assert all(rule.ge == 0 and rule.le == 1 for _, rule in probabilities), probabilities


def test_the_shipped_configs_satisfy_every_rule():
    """Every config file, and every variant of every sweep file of experiments/ (one seed each); not
    the claims file of experiments/verdicts.py, which names no config."""
    for path in sorted(Path(CONFIG_DIR).glob("*.yaml")) + sorted((CONFIG_DIR.parent / "experiments").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        if "claims" in content:
            continue
        if "base" in content:
            sweep = load_sweep(path)
            assert len(plan_runs(dataclasses.replace(sweep, seeds=sweep.seeds[:1]))) == len(sweep.variants)
        else:
            load_config(path)
