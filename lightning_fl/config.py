"""Run configuration: a typed OmegaConf schema, file composition and command-line overrides.

Every hyper-parameter lives here with its type; a YAML file or override that names a key the
schema does not know, or gives a value of the wrong type, is an error. Experiment files compose
smaller files through a `defaults:` list (paths relative to `configs/`, merged in order, the
file's own keys last), so `configs/` mirrors the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_fl.errors import UserInputError
from lightning_fl.labels import LabelSpaceError, label_space_from_config

PHASES = ("portal_venous", "unenhanced")  # contrast phases the synthetic scanners can acquire
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "condistfl_synthetic.yaml"


class ConfigError(UserInputError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class LabelsConfig:
    classes: list[str] = field(default_factory=list)  # index order, 0 = background
    tumors: dict[str, str] = field(default_factory=dict)  # tumour class -> its organ


@dataclass
class SiteConfig:
    name: str = "???"
    datalist: str = "???"  # datalist JSON, relative to data.root
    classes: list[str] = field(default_factory=list)  # the classes this site annotates
    cost: float = 1.0  # relative time per round: sites are spread over ranks to balance it


@dataclass
class ScannerConfig:
    """One synthetic site's scanner protocol and case counts."""

    train: int = 8
    validation: int = 2
    test: int = 2
    spacing_mm: list[float] = field(default_factory=lambda: [2.0, 2.0, 3.0])  # native voxel size
    fov_mm: list[float] = field(default_factory=lambda: [300.0, 240.0, 220.0])  # field of view: x, y, z
    phase: str = "portal_venous"  # contrast phase: "portal_venous" or "unenhanced" (its own organ HU)
    hu_offset: float = 0.0  # calibration offset added to every voxel
    contrast_scale: float = 1.0  # scales enhancement above water (contrast timing and dose)
    noise_hu: float = 15.0  # standard deviation of the image noise
    body_scale: list[float] = field(default_factory=lambda: [0.92, 1.0])  # range of the trunk's size factor
    fat_mm: list[float] = field(default_factory=lambda: [15.0, 25.0])  # range of the subcutaneous fat


@dataclass
class SyntheticConfig:
    seed: int = 0
    # per case, for organs whose tumours the site does not label; where it does, the lesion
    # prevalence of the dataset the site stands for (synthetic.TUMOR_PREVALENCE)
    incidental_tumor_probability: float = 0.05
    scanners: dict[str, ScannerConfig] = field(default_factory=dict)  # keyed by site name


@dataclass
class IntensityConfig:
    """CT windowing: clip HU to [hu_min, hu_max], then (x - center) / scale."""

    hu_min: float = -54.0
    hu_max: float = 258.0
    center: float = 100.0
    scale: float = 50.0


@dataclass
class AugmentationConfig:
    """Probabilities and ranges of the spatial and intensity augmentations (spec §3)."""

    rotate_prob: float = 0.2
    rotate_degrees: float = 30.0
    zoom_prob: float = 0.2
    zoom_range: list[float] = field(default_factory=lambda: [0.7, 1.4])
    noise_prob: float = 0.15
    noise_std: float = 0.1
    smooth_prob: float = 0.15
    smooth_sigma: list[float] = field(default_factory=lambda: [0.5, 1.5])
    brightness_prob: float = 0.15
    brightness_range: list[float] = field(default_factory=lambda: [0.7, 1.3])
    contrast_prob: float = 0.15
    contrast_range: list[float] = field(default_factory=lambda: [0.65, 1.5])
    lowres_prob: float = 0.25
    lowres_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    gamma_prob: float = 0.15
    inverse_gamma_prob: float = 0.15
    gamma_range: list[float] = field(default_factory=lambda: [0.8, 1.2])
    flip_prob: float = 0.5


@dataclass
class DataConfig:
    root: str = "???"  # folder holding the datalists
    sites: list[SiteConfig] = field(default_factory=list)
    external: list[SiteConfig] = field(default_factory=list)  # test-only sites, labelled per organ
    synthetic: Optional[SyntheticConfig] = None  # generate the phantom federation into root if missing
    spacing_mm: list[float] = field(default_factory=lambda: [1.44423774, 1.44423774, 2.87368553])
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    patch_size: list[int] = field(default_factory=lambda: [224, 224, 64])
    crop: str = "pos_neg"  # patch centres: "pos_neg" (foreground : background at pos_neg_ratio) or "classes" (each class alike)
    pos_neg_ratio: list[float] = field(default_factory=lambda: [2.0, 1.0])
    samples_per_volume: int = 2
    batch_size: int = 2  # volumes per step; each gives samples_per_volume patches
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    cache_rate: float = 1.0  # share of the cases kept in memory after preprocessing (CacheDataset)
    cache_dir: Optional[str] = None  # set: preprocessed cases are kept on disk there instead (PersistentDataset)
    num_workers: int = 0  # data-loader processes per site; part of the random stream, so of the results
    check_before_fit: bool = True  # read every file once and list all data problems before training


@dataclass
class ModelConfig:
    """MONAI DynUNet; in/out channels come from the data and the label space."""

    filters: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320, 320])
    kernel_size: list[list[int]] = field(default_factory=lambda: [[3, 3, 1]] + [[3, 3, 3]] * 5)
    strides: list[list[int]] = field(default_factory=lambda: [[1, 1, 1], [2, 2, 1]] + [[2, 2, 2]] * 4)
    deep_supervision_heads: int = 3
    norm: str = "instance"
    res_block: bool = False
    channels_last: bool = True  # channels_last_3d memory format: faster 3D convolutions


@dataclass
class MethodConfig:
    condist: bool = True  # False: marginal loss only (the FedAvg/FedOpt baselines)
    ce: str = "official"  # "official" or "marginal" (spec §2)
    temperature: float = 2.0
    condist_weight_start: float = 0.01  # w_r at the first round
    condist_weight_end: float = 1.0  # w_r at the last round


@dataclass
class OptimConfig:
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 1e-5
    eta_min: float = 1e-7
    grad_clip_norm: float = 1.0


@dataclass
class FederationConfig:
    rounds: int = 120
    local_steps: int = 1000
    strategy: str = "fedopt"  # "fedavg" or "fedopt"
    weighting: str = "equal"  # "equal" or "cases" (training cases per site)
    server_lr: float = 1.0
    server_lr_min: float = 0.9
    server_momentum: float = 0.6
    min_sites: int = 1  # a round whose failed sites leave fewer updates than this stops the run


@dataclass
class EvalConfig:
    roi_size: list[int] = field(default_factory=lambda: [224, 224, 64])
    overlap: float = 0.5
    sw_batch_size: int = 4
    blend_mode: str = "gaussian"
    every: int = 1  # validate the global model every this many rounds, and after the last; the best is chosen among those


@dataclass
class FabricConfig:
    """Passed to Lightning Fabric; processes = devices × num_nodes (see README, "Scaling out")."""

    accelerator: str = "auto"
    # processes per node; "auto": on a CPU one per site up to the number of cores (sites train in
    # parallel, a thread each), on GPUs one per GPU
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # with several processes: "ddp" (launched as scripts) or "ddp_spawn"
    precision: str = "auto"  # "auto": bf16-mixed where the hardware has bf16, else 32-true


@dataclass
class WandbConfig:
    mode: str = "offline"  # "offline" (sync later with `wandb sync`), "online" or "disabled"
    project: str = "lightning-fl"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bars; they stay quiet when stdout is not a terminal


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "???"
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fl: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_CHOICES = {
    "method.ce": ("official", "marginal"),
    "data.crop": ("pos_neg", "classes"),
    "fl.strategy": ("fedavg", "fedopt"),
    "fl.weighting": ("equal", "cases"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "eval.blend_mode": ("gaussian", "constant"),
    "fabric.strategy": ("auto", "ddp", "ddp_spawn"),
}


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several exception types
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return node


def _compose(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The file's `defaults:` (recursively, in order) followed by the file itself."""
    if path in stack:
        raise ConfigError(f"{path}: circular defaults through {[str(p) for p in stack]}")
    node = _read_yaml(path)
    defaults = node.pop("defaults", [])
    if not isinstance(defaults, (list, ListConfig)):
        raise ConfigError(f"{path}: 'defaults' must be a list of config files relative to {CONFIG_DIR}")
    parts: list[tuple[Path, DictConfig]] = []
    for name in defaults:
        child = CONFIG_DIR / (name if str(name).endswith(".yaml") else f"{name}.yaml")
        parts += _compose(child, stack + (path,))
    return parts + [(path, node)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema ← composed YAML ← `dotted.key=value` overrides; validated, with interpolations resolved."""
    path = Path(path) if path is not None else CONFIG_DIR / DEFAULT_CONFIG
    cfg = OmegaConf.structured(RunConfig)
    for source, node in _compose(path):
        cfg = _merge(cfg, node, str(source))
    return _finish(cfg, overrides, str(path))


def config_from_container(content: dict[str, Any], overrides: list[str] | None, source: str) -> DictConfig:
    """A run config saved inside a checkpoint or an exported model, checked like a file. Models
    saved while `data.external` was one site (or null) still load: it becomes a list."""
    data = content.get("data")
    if isinstance(data, dict) and not isinstance(data.get("external", []), list):
        content = content | {"data": data | {"external": [data["external"]] if data["external"] else []}}
    return _finish(_merge(OmegaConf.structured(RunConfig), content, source), overrides, source)


def _finish(cfg: DictConfig, overrides: list[str] | None, source: str) -> DictConfig:
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:  # `update` also reaches into lists (data.sites.0.classes=[liver])
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"override '{item}': {_first_line(err)}") from err
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from err
    if missing:
        raise ConfigError(f"{source}: required config keys have no value: {missing}")
    try:
        _validate(cfg)
    except LabelSpaceError as err:
        raise ConfigError(str(err)) from err
    return cfg


def _merge(cfg: DictConfig, node: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{source}: invalid config key '{key}': {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    """OmegaConf appends its own context lines; the first line says what is wrong."""
    return str(getattr(err, "msg", err)).splitlines()[0]


def _validate(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got '{value}'")
    if cfg.eval.every < 1:
        raise ConfigError(f"eval.every must be ≥ 1 (validate every this many rounds), got {cfg.eval.every}")
    if cfg.fl.rounds < 1 or cfg.fl.local_steps < 1:
        raise ConfigError(f"fl.rounds and fl.local_steps must be ≥ 1, got {cfg.fl.rounds}, {cfg.fl.local_steps}")
    if not 1 <= cfg.fl.min_sites <= len(cfg.data.sites):
        raise ConfigError(f"fl.min_sites must lie in [1, {len(cfg.data.sites)}] (the number of sites), got {cfg.fl.min_sites}")
    devices = cfg.fabric.devices
    if devices != "auto" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ConfigError(f"fabric.devices: expected a whole number ≥ 1 or 'auto', got {devices!r}")
    if cfg.fabric.num_nodes < 1:
        raise ConfigError(f"fabric.num_nodes must be ≥ 1, got {cfg.fabric.num_nodes}")
    costs = {s.name: s.cost for s in cfg.data.sites if not s.cost > 0}
    if costs:
        raise ConfigError(f"data.sites: cost must be > 0, got {costs}")
    if not cfg.optim.lr > 0 or cfg.optim.momentum < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError(
            f"optim.lr must be > 0 and optim.momentum, optim.weight_decay ≥ 0, got {cfg.optim.lr}, "
            f"{cfg.optim.momentum}, {cfg.optim.weight_decay}"
        )
    if cfg.method.temperature <= 0:
        raise ConfigError(f"method.temperature must be > 0, got {cfg.method.temperature}")
    if not cfg.data.sites:
        raise ConfigError("data.sites: at least one site is needed")
    names = [s.name for s in all_sites(cfg)]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sites: site names must be unique, got {names}")
    labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
    for site in all_sites(cfg):
        labels.foreground(site.classes, where=f"site '{site.name}' (classes)")
    if cfg.data.synthetic is not None:
        unknown = set(cfg.data.synthetic.scanners) ^ set(names)
        if unknown:
            raise ConfigError(
                f"data.synthetic.scanners must have one entry per site {names}, mismatched: {sorted(unknown)}"
            )
        for name, scanner in cfg.data.synthetic.scanners.items():
            if scanner.phase not in PHASES:
                raise ConfigError(f"data.synthetic.scanners.{name}.phase: expected one of {list(PHASES)}, got '{scanner.phase}'")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def all_sites(cfg: DictConfig) -> list[Any]:
    """The training sites, then the external test sites."""
    return list(cfg.data.sites) + list(cfg.data.external)


def config_changes(before: DictConfig, after: DictConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (what a resumed run would change)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    a, b = (flat(OmegaConf.to_container(c, resolve=True)) for c in (before, after))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
