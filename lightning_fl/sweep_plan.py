"""A sweep file, checked, and the runs it plans: each variant × seed with its overrides, config and folder.

    base: configs/condistfl_synthetic.yaml      the config every run starts from
    seeds: [0, 1, 2]
    overrides: [fl.rounds=8]                     every variant's
    variants: {condistfl: [method=condistfl], fedavg: [method=fedavg]}
    comparisons: [[condistfl, fedavg]]           paired differences in results.md
    output_dir: runs/sweeps/<file's name>        a `run_folder.SweepFolder`
    slurm: {nodes: 1, gpus_per_node: 4, ...}     each run's job with `--launcher slurm` (`SlurmResources`)

Every mistake names the file and the key and says what was expected (`docs/how-to/sweeps.md`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from lightning_fl.config import CONFIG_DIR, ConfigError, load_configs
from lightning_fl.run_folder import RunFolder, SweepFolder

# `shared` is not read: it holds lists of overrides that variants share through YAML anchors
KEYS = ("base", "seeds", "variants", "overrides", "comparisons", "output_dir", "slurm", "shared")
REQUIRED = ("base", "seeds", "variants")
NAME = re.compile(r"[A-Za-z0-9_-]+")
LAUNCHERS = ("local", "slurm", "submitit-local")  # a process per run; a SLURM job; a submitit job here
# set by the sweep for each run; a sweep file that set them would be silently overruled
SET_BY_SWEEP = ("seed", "output_dir", "logger.wandb.group", "logger.wandb.job_type", "logger.wandb.name")


@dataclass(frozen=True)
class SlurmResources:
    """What each run's job asks of SLURM under `sweep --launcher slurm` (submitit's parameters).
    With GPUs, a run trains with one task per GPU of each node (fabric.devices, fabric.num_nodes)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: the run's processes are the ones its config starts, on the job's CPUs
    cpus_per_task: int = 2
    mem_gb: float = 16.0
    timeout_min: int = 60
    signal_delay_s: int = 90  # how long before timeout_min the job is told to stop and requeue (time to save)
    partition: str | None = None
    additional: dict[str, Any] = field(default_factory=dict)  # more sbatch options: {account: x, qos: y}


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file; `base` is resolved, `output_dir` as given (relative to the current directory)."""

    path: Path
    base: Path
    seeds: list[int]
    variants: dict[str, list[str]]
    overrides: list[str]
    comparisons: list[tuple[str, str]]
    output_dir: Path
    slurm: SlurmResources = field(default_factory=SlurmResources)

    @property
    def name(self) -> str:
        """The W&B group of its runs: the sweep file's stem."""
        return self.path.stem

    @property
    def folder(self) -> SweepFolder:
        return SweepFolder(self.output_dir)


@dataclass
class PlannedRun:
    """One variant × seed: its folder, the overrides and config it runs with, and what is left to do."""

    variant: str
    seed: int
    folder: RunFolder
    log: Path  # its stdout and stderr, beside its folder, appended at every start
    overrides: list[str]
    cfg: DictConfig
    action: str = "start"  # start, skip (finished), resume (cut off), overwrite (a folder without a run state)
    changed: list[str] = field(default_factory=list)  # keys whose values its config.yaml has otherwise
    # where it has a run state, its config.yaml (or `cfg`, where the same but for what the sweep leaves uncompared)
    saved: DictConfig | None = None

    @property
    def name(self) -> str:
        """How tables and messages name the run: `<variant>/seed<seed>`."""
        return f"{self.variant}/seed{self.seed}"


# ---------------------------------------------------------------- the sweep file
def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every mistake names the file and the key, and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(content, dict):
        raise ConfigError(
            f"{path}: expected a mapping with the keys {list(REQUIRED)} (optionally "
            f"{[k for k in KEYS if k not in REQUIRED]}), got {type(content).__name__}"
        )
    unknown = sorted(str(k) for k in content if k not in KEYS)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{path}: unknown key{plural} {unknown}; a sweep file has {list(KEYS)}")
    missing = [k for k in REQUIRED if k not in content]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}: a sweep needs a base config, seeds and variants")
    variants = _variants(path, content["variants"])
    output_dir = content.get("output_dir", f"runs/sweeps/{path.stem}")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{path}: output_dir: expected a folder (a string), got {output_dir!r}")
    return Sweep(
        path=path,
        base=_base(path, content["base"]),
        seeds=_seeds(path, content["seeds"]),
        variants=variants,
        overrides=_overrides(path, "overrides", content.get("overrides", [])),
        comparisons=_comparisons(path, content.get("comparisons", []), variants),
        output_dir=Path(output_dir).expanduser(),
        slurm=_slurm(path, content.get("slurm", {})),
    )


def _slurm(path: Path, value: Any) -> SlurmResources:
    """The `slurm` mapping: whole numbers ≥ 1 (GPUs ≥ 0), memory in GB > 0, a partition name, a
    mapping of further sbatch options, and a warning before the time limit that falls within it."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: slurm: expected a mapping such as {{nodes: 1, gpus_per_node: 4}}, got {value!r}")
    known = [f.name for f in fields(SlurmResources)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ConfigError(f"{path}: slurm: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; expected {known}")
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "timeout_min", "signal_delay_s"):
        least = 0 if key == "gpus_per_node" else 1
        if key in value and (isinstance(value[key], bool) or not isinstance(value[key], int) or value[key] < least):
            raise ConfigError(f"{path}: slurm.{key}: expected a whole number ≥ {least}, got {value[key]!r}")
    if "mem_gb" in value and (
        isinstance(value["mem_gb"], bool) or not isinstance(value["mem_gb"], (int, float)) or value["mem_gb"] <= 0
    ):
        raise ConfigError(f"{path}: slurm.mem_gb: expected a number of GB > 0, got {value['mem_gb']!r}")
    if value.get("partition") is not None and not isinstance(value["partition"], str):
        raise ConfigError(f"{path}: slurm.partition: expected a partition name, got {value['partition']!r}")
    if not isinstance(value.get("additional", {}), dict):
        raise ConfigError(
            f"{path}: slurm.additional: expected a mapping of sbatch options, e.g. {{account: abc}}, "
            f"got {value['additional']!r}"
        )
    resources = SlurmResources(**value)
    if resources.signal_delay_s >= 60 * resources.timeout_min:
        raise ConfigError(
            f"{path}: slurm.signal_delay_s: expected fewer seconds than timeout_min gives a job "
            f"({60 * resources.timeout_min} s), got {resources.signal_delay_s}"
        )
    return resources


def _base(path: Path, value: Any) -> Path:
    """A relative base config is looked for beside the sweep file, then in the current directory,
    then in the repository (so `configs/...` works from anywhere)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: base: expected the path of a config file (a string), got {value!r}")
    given = Path(value).expanduser()
    candidates = (
        [given]
        if given.is_absolute()
        else [(path.parent / given).absolute(), Path.cwd() / given, CONFIG_DIR.parent / given]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(f"{path}: base: config file {value} not found (looked for {looked})")


def _seeds(path: Path, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: seeds: expected a non-empty list of whole numbers, e.g. [0, 1, 2], got {value!r}")
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
            raise ConfigError(f"{path}: seeds: expected whole numbers in [0, 2**32 - 1], got {seed!r}")
    twice = sorted({s for s in value if value.count(s) > 1})
    if twice:
        raise ConfigError(f"{path}: seeds: each seed once, got {twice} more than once in {value}")
    return list(value)


def _variants(path: Path, value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"{path}: variants: expected a non-empty mapping of name -> list of overrides key=value, "
            f"e.g. {{fedavg: [fl.aggregation=fedavg]}}, got {value!r}"
        )
    variants = {}
    for name, overrides in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: variants: a variant's name is its folder's, expected letters, digits, "
                f"'_' and '-', got {name!r}"
            )
        variants[name] = _overrides(path, f"variants.{name}", overrides)
    return variants


def _overrides(path: Path, key: str, value: Any) -> list[str]:
    """A list of `key=value` strings (the values are checked when the configs load); a list inside
    it (a YAML alias of a `shared` list) is spliced in."""
    if not isinstance(value, list):
        raise ConfigError(f"{path}: {key}: expected a list of overrides key=value ([] for none), got {value!r}")
    value = [entry for item in value for entry in (item if isinstance(item, list) else [item])]
    for item in value:
        if not isinstance(item, str) or not item.partition("=")[0] or "=" not in item:
            raise ConfigError(f"{path}: {key}: expected overrides of the form key=value, got {item!r}")
        if item.partition("=")[0] in SET_BY_SWEEP:
            raise ConfigError(
                f"{path}: {key}: '{item}': the sweep sets {', '.join(SET_BY_SWEEP)} for each run "
                "(from seeds, output_dir, the sweep file's name and the variant's)"
            )
    return list(value)


def _comparisons(path: Path, value: Any, variants: dict[str, list[str]]) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: comparisons: expected a list of pairs [a, b] of variant names, got {value!r}")
    pairs = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, str) for v in pair):
            raise ConfigError(f"{path}: comparisons: expected pairs [a, b] of variant names, got {pair!r}")
        unknown = [v for v in pair if v not in variants]
        if unknown:
            raise ConfigError(
                f"{path}: comparisons: {pair}: {', '.join(map(repr, unknown))} is not a variant; "
                f"the variants are {list(variants)}"
            )
        if pair[0] == pair[1]:
            raise ConfigError(f"{path}: comparisons: {pair}: expected two different variants")
        pairs.append((pair[0], pair[1]))
    return pairs


# ---------------------------------------------------------------- the runs
def plan_runs(sweep: Sweep) -> list[PlannedRun]:
    """Every run with its config, loaded now, so that a mistake in any variant is reported before
    anything trains. Seed by seed, so that an early stop leaves whole seeds to compare. Each
    variant's files are composed once for all its seeds (`config.load_configs`)."""

    def per_seed(variant: str, seed: int) -> list[str]:
        path = sweep.folder.run(variant, seed).path
        return [f"seed={seed}", f"output_dir={path}", f"logger.wandb.name={variant}-seed{seed}"]

    shared = {
        variant: [*sweep.overrides, *own, f"logger.wandb.group={sweep.name}", f"logger.wandb.job_type={variant}"]
        for variant, own in sweep.variants.items()
    }
    configs, problems = {}, {}
    for variant in sweep.variants:
        try:
            seeded = load_configs(sweep.base, shared[variant], [per_seed(variant, seed) for seed in sweep.seeds])
        except ConfigError as err:
            problems[variant] = f"variant '{variant}': {err}"
            continue
        configs |= {(variant, seed): cfg for seed, cfg in zip(sweep.seeds, seeded)}
    if problems:
        raise ConfigError(f"{sweep.path}: " + "; ".join(problems.values()))
    runs = []
    for seed in sweep.seeds:
        for variant in sweep.variants:
            folder, log = sweep.folder.run(variant, seed), sweep.folder.log(variant, seed)
            overrides = shared[variant] + per_seed(variant, seed)
            runs.append(PlannedRun(variant, seed, folder, log, overrides, configs[variant, seed]))
    return runs
