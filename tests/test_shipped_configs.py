"""Every shipped config loads and validates, and each value lives in one place: the schema
(lightning_fl/config.py) holds the paper's values, a config group's file only its departures from
them (configs/README.md). A group file that restated a schema default would be a second copy of a
value, which the next change of the value would miss."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_fl import config as config_module
from lightning_fl.config import CONFIG_DIR, RunConfig, config_groups, load_config
from lightning_fl.sweep_plan import load_sweep, plan_runs

EXPERIMENTS = CONFIG_DIR.parent / "experiments"
BASE = CONFIG_DIR / "condistfl_synthetic.yaml"  # every group's every file is composed onto the demo
TOP_LEVEL = sorted(CONFIG_DIR.glob("*.yaml"))
GROUP_FILES = [(group, path) for group in config_groups() for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]
EXPERIMENT_FILES = {p: yaml.safe_load(p.read_text()) for p in sorted(EXPERIMENTS.glob("*.yaml"))}
SWEEPS = [p for p, content in EXPERIMENT_FILES.items() if "base" in content]
CLAIMS = [p for p, content in EXPERIMENT_FILES.items() if "claims" in content]  # experiments/verdicts.py's input
PLAIN = [p for p in EXPERIMENT_FILES if p not in SWEEPS + CLAIMS]


def _name(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR.parent))


def test_every_section_of_the_schema_has_its_config_group():
    sections = {f.name for f in dataclasses.fields(RunConfig)} - {"seed", "output_dir"}
    assert set(config_groups()) == sections
    assert all(any(g == group for g, _ in GROUP_FILES) for group in sections)


@pytest.mark.parametrize("path", TOP_LEVEL + PLAIN, ids=_name)
def test_every_config_file_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.labels.classes[0] == "background" and cfg.data.sites


@pytest.mark.parametrize("group,path", GROUP_FILES, ids=lambda v: v if isinstance(v, str) else _name(v))
def test_every_group_file_composes_onto_the_demo(group, path):
    cfg = load_config(BASE, [f"{group}={path.stem}"])
    for key, value in _leaves(yaml.safe_load(path.read_text())):  # the file's values are the run's
        if not (isinstance(value, str) and "${" in value) and not _holds_mappings(value):
            actual = OmegaConf.select(cfg, key)
            assert (OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual) == value, key


@pytest.mark.parametrize("path", SWEEPS, ids=_name)
def test_every_variant_of_every_sweep_file_loads_and_validates(path):
    sweep = load_sweep(path)
    runs = plan_runs(dataclasses.replace(sweep, seeds=sweep.seeds[:1]))  # the seed changes no other key
    assert [run.variant for run in runs] == list(sweep.variants)


def test_a_group_named_after_a_composed_config_replaces_its_file_of_that_group(tmp_path):
    """A group file states departures only, so stacking a second file of a group onto one that
    already has one (`defaults: [smoke, model/dynunet_paper]`) must replace the first, not merge
    into it: as a command-line choice does."""
    stacked = tmp_path / "stacked.yaml"
    stacked.write_text("defaults: [condistfl_synthetic, model/dynunet_paper, method/fedprox]\n")
    assert load_config(stacked) == load_config(BASE, ["model=dynunet_paper", "method=fedprox"])
    assert load_config(EXPERIMENTS / "fedavg_synthetic.yaml").method == load_config(BASE, ["method=fedavg"]).method


# ---------------------------------------------------------------- each default stated once
def restated_defaults(node: Any, schema: type = RunConfig, prefix: str = "") -> list[str]:
    """`key = value` for every value of a YAML mapping equal to the schema's default at that key,
    descending into sections, lists of sites and the scanners' mapping."""
    found = []
    hints = typing.get_type_hints(schema, vars(config_module))
    for spec in dataclasses.fields(schema):
        if spec.name not in node:
            continue
        key, value, kind = f"{prefix}{spec.name}", node[spec.name], _section(hints[spec.name])
        if kind is not None and isinstance(value, dict):
            found += restated_defaults(value, kind, f"{key}.")
        elif (item := _items(hints[spec.name])) is not None and isinstance(value, (dict, list)):
            entries = value.items() if isinstance(value, dict) else enumerate(value)
            found += [
                f
                for name, entry in entries
                if isinstance(entry, dict)
                for f in restated_defaults(entry, item, f"{key}.{name}.")
            ]
        elif value == _default(spec):
            found.append(f"{key} = {value!r}")
    return found


def _default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return spec.default


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (also `Optional[...]`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def _items(hint: Any) -> type | None:
    """The dataclass of a list's items or a mapping's values (`list[SiteConfig]`), or None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (list, dict) else ()
    return args[-1] if args and dataclasses.is_dataclass(args[-1]) else None


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value of a YAML mapping that is not itself a mapping."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def _holds_mappings(value: Any) -> bool:
    """A list of sites: each gains the schema's keys as it loads, so it is compared by loading."""
    return isinstance(value, list) and any(isinstance(v, dict) for v in value)


@pytest.mark.parametrize("group,path", GROUP_FILES, ids=lambda v: v if isinstance(v, str) else _name(v))
def test_no_group_file_restates_a_schema_default(group, path):
    content = yaml.safe_load(path.read_text())
    assert restated_defaults(content) == [], (
        f"{_name(path)} restates the schema's defaults (lightning_fl/config.py): leave them out, the "
        "schema holds them; a group file holds only its departures (configs/README.md)"
    )


def test_the_restated_default_check_sees_every_kind_of_key():
    assert restated_defaults({"method": {"temperature": 2.0, "condist": False}}) == ["method.temperature = 2.0"]
    assert restated_defaults({"data": {"synthetic": None, "augmentation": {"flip_prob": 0.5}}}) == [
        "data.synthetic = None",
        "data.augmentation.flip_prob = 0.5",
    ]
    assert restated_defaults({"data": {"synthetic": {"scanners": {"a": {"hu_offset": 0.0, "noise_hu": 3.0}}}}}) == [
        "data.synthetic.scanners.a.hu_offset = 0.0"
    ]
    assert restated_defaults({"data": {"sites": [{"name": "a", "cost": 1.0}]}}) == ["data.sites.0.cost = 1.0"]
    assert restated_defaults({"model": {"filters": [32, 64, 128, 256, 320, 320]}}) == [
        "model.filters = [32, 64, 128, 256, 320, 320]"
    ]
    assert restated_defaults({"data": {"intensity": {"hu_min": -54.0}}, "fabric": {"devices": 1}}) == [
        "data.intensity.hu_min = -54.0",
        "fabric.devices = 1",
    ]
