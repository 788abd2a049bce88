"""`lightning-fl sweep FILE`: an experiment's variants × seeds, each a `fit` run in its own process
and folder, resumable as a whole, then its tables of the finished runs: each class's test Dice as
mean ± std over seeds, and paired bootstrap differences between variants over the same cases.

    <output_dir>/runs/<variant>/seed<seed>/      a `fit` run folder (its test_cases.csv feeds the tables)
    <output_dir>/runs/<variant>/seed<seed>.log   the run's stdout and stderr, appended at every start
    <output_dir>/results.csv, results.md         rebuilt from the finished runs (also by --tables-only)
    <output_dir>/comparison.png                   the test table as bars (and aggregation_frequency.png)

A run is its own process so that one crash costs one run, and so that runs can train side by side
(`--parallel`); a run's folder tells what is left to do (see `decide`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lightning_fl.analysis import (
    COMPARISON_PLOT,
    FREQUENCY_PLOT,
    comparison_figure,
    frequency_figure,
    frequency_points,
    mean_std,
    run_mean,
    write_png,
)
from lightning_fl.checkpoint import STATE_FILE, atomic_write_text
from lightning_fl.config import CONFIG_DIR, ConfigError, config_changes, load_config
from lightning_fl.errors import RunStopped
from lightning_fl.loggers import format_table
from lightning_fl.scores import (  # noqa: F401 - ResultsError: what reading the runs raises
    CASES_FILE,
    EXTERNAL,
    GLOBAL,
    TEST,
    CaseRow,
    ResultsError,
    headline_rows,
    pooled,
    read_test_cases,
)

# `shared` is not read: it holds lists of overrides that variants share through YAML anchors
KEYS = ("base", "seeds", "variants", "overrides", "comparisons", "output_dir", "shared")
REQUIRED = ("base", "seeds", "variants")
NAME = re.compile(r"[A-Za-z0-9_-]+")
# set by the sweep for each run; a sweep file that set them would be silently overruled
SET_BY_SWEEP = ("seed", "output_dir", "logger.wandb.group", "logger.wandb.job_type", "logger.wandb.name")
SUMMARY_FILE = "summary.json"  # written by fit as its last step: the run is finished
RESULT_COLUMNS = ("variant", "seed", "phase", "model", "site", "class", "dice", "cases")
ALL_CLASSES = "all classes"
RESAMPLES, BOOTSTRAP_SEED = 10_000, 0
POLL_S = 0.2
STOP_WAIT_S = 30.0  # how long stopped runs get to exit before SIGKILL


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

    @property
    def name(self) -> str:
        """The W&B group of its runs: the sweep file's stem."""
        return self.path.stem


@dataclass
class Run:
    """One variant × seed: its folder, the overrides and config it runs with, and what is left to do."""

    variant: str
    seed: int
    folder: Path
    overrides: list[str]
    cfg: DictConfig
    action: str = "start"  # start, skip (finished), resume (cut off), overwrite (a folder without a run state)
    changed: list[str] = field(default_factory=list)  # keys whose values its config.yaml has otherwise
    saved: DictConfig | None = None  # its config.yaml, where it has a run state

    @property
    def name(self) -> str:
        """How tables and messages name the run: `<variant>/seed<seed>`."""
        return f"{self.variant}/seed{self.seed}"

    @property
    def log(self) -> Path:
        """The run's log beside its folder: its stdout and stderr, appended at every start."""
        return self.folder.with_name(f"{self.folder.name}.log")


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
    )


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
            f"e.g. {{fedavg: [fl.strategy=fedavg]}}, got {value!r}"
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
def plan_runs(sweep: Sweep) -> list[Run]:
    """Every run with its config, loaded now, so that a mistake in any variant is reported before
    anything trains. Seed by seed, so that an early stop leaves whole seeds to compare."""
    runs, problems = [], {}
    for seed in sweep.seeds:
        for variant, own in sweep.variants.items():
            if variant in problems:
                continue
            folder = sweep.output_dir / "runs" / variant / f"seed{seed}"
            overrides = [
                *sweep.overrides,
                *own,
                f"seed={seed}",
                f"output_dir={folder}",
                f"logger.wandb.group={sweep.name}",
                f"logger.wandb.job_type={variant}",
                f"logger.wandb.name={variant}-seed{seed}",
            ]
            try:
                cfg = load_config(sweep.base, overrides)
            except ConfigError as err:
                problems[variant] = f"variant '{variant}' (seed {seed}): {err}"
                continue
            runs.append(Run(variant, seed, folder, overrides, cfg))
    if problems:
        raise ConfigError(f"{sweep.path}: " + "; ".join(problems.values()))
    return runs


def saved_changes(saved: DictConfig, planned: DictConfig) -> list[str]:
    """Keys whose values differ between a run's config.yaml and the config the sweep plans for it.
    Not compared: output_dir (a sweep may be run from elsewhere), fabric.devices (a site-parallel
    run computes the same on any number of processes, and `--parallel` sets 1) and a planned
    fabric.precision `auto` (fit writes what `auto` chose into config.yaml)."""
    changed = config_changes(saved, planned, ignore=("output_dir", "fabric.devices"))
    return [k for k in changed if not (k == "fabric.precision" and planned.fabric.precision == "auto")]


def decide(runs: list[Run], rerun_changed: bool = False) -> None:
    """What each run's folder leaves to do: none → start; summary.json → finished, skip; state.ckpt
    without summary.json → cut off, `fit --resume`; anything else → `fit --overwrite` (fit moves the
    old folder aside). A finished or cut-off run whose config.yaml differs from what the sweep now
    plans is refused (the sweep file was edited), or with `rerun_changed` started again."""
    for run in runs:
        finished = (run.folder / SUMMARY_FILE).is_file()
        if finished or (run.folder / STATE_FILE).is_file():
            run.saved = load_config(run.folder / "config.yaml")
            run.changed = saved_changes(run.saved, run.cfg)
            run.action = "skip" if finished else "resume"
        else:
            run.action = "overwrite" if run.folder.exists() else "start"
    changed = [run for run in runs if run.changed]
    if changed and not rerun_changed:
        listing = "; ".join(f"{run.name} ({', '.join(run.changed)})" for run in changed)
        raise ConfigError(
            f"the config of {len(changed)} run{'s' if len(changed) > 1 else ''} differs from what the sweep file "
            f"now gives (was it edited since they ran?): {listing}; pass --rerun-changed to train them again "
            "(each old folder is moved aside), or undo the change"
        )
    for run in changed:
        run.action = "overwrite"


def fit_command(sweep: Sweep, run: Run, parallel: int) -> list[str]:
    """The `fit` command line of a run's next start. Runs side by side get one process each."""
    fit = [sys.executable, "-m", "lightning_fl", "fit"]
    if run.action == "resume":
        assert run.saved is not None
        one_process = parallel > 1 and run.saved.fabric.devices != 1
        return (
            fit + ["--resume", str(run.folder)] + (["--allow-config-change", "fabric.devices=1"] if one_process else [])
        )
    overwrite = ["--overwrite"] if run.action == "overwrite" else []
    one_process = ["fabric.devices=1"] if parallel > 1 else []
    return fit + ["--config", str(sweep.base), *overwrite, *run.overrides, *one_process]


@dataclass(frozen=True)
class Outcome:
    """How a run ended in this sweep: its line of the summary table."""

    status: str
    seconds: float | None = None
    failed: bool = False


class _Child:
    """A run's `fit` process in its own process group (so stopping it reaches the processes it
    starts); stdout and stderr go to the run's log, the last line of stderr is kept."""

    def __init__(self, run: Run, command: list[str], env: dict[str, str]) -> None:
        self.run, self.start = run, time.monotonic()
        run.log.parent.mkdir(parents=True, exist_ok=True)
        self.log = run.log.open("ab", buffering=0)
        self.log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        self.last_error = ""
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.write(line)
            if line.strip():
                self.last_error = line.decode(errors="replace").strip()

    def stop(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # already gone
            pass

    def outcome(self) -> Outcome:
        """After the process ended: done, resumed or failed (with stderr's last line)."""
        self.reader.join(timeout=5)
        self.log.close()
        seconds, code = time.monotonic() - self.start, self.process.returncode
        if code == 0:
            return Outcome("resumed" if self.run.action == "resume" else "done", seconds)
        reason = self.last_error or (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
        return Outcome(f"failed: {reason}", seconds, failed=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def execute(sweep: Sweep, runs: list[Run], parallel: int) -> dict[str, Outcome]:
    """Run what `decide` left to do, `parallel` at a time; a failed run does not stop the others.
    Ctrl-C or SIGTERM stops the running ones (they resume at the next start) and raises RunStopped."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # the logs fill as the runs go
    if parallel > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // parallel))
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    outcomes = {run.name: Outcome("skipped: finished before") for run in runs if run.action == "skip"}
    pending = [run for run in runs if run.action != "skip"]
    active: list[_Child] = []
    bar = tqdm(total=len(runs), initial=len(outcomes), desc="sweep", unit="run", disable=None)
    shown = ""
    handlers = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                active.append(_Child(run, fit_command(sweep, run, parallel), env))
            running = ", ".join(child.run.name for child in active)
            if running != shown:
                bar.set_postfix_str(running)
                shown = running
            time.sleep(POLL_S)
            for child in [c for c in active if c.process.poll() is not None]:
                active.remove(child)
                outcome = outcomes[child.run.name] = child.outcome()
                bar.update(1)
                tqdm.write(f"{child.run.name}: {outcome.status} ({_duration(outcome.seconds)}; log: {child.run.log})")
    except KeyboardInterrupt:
        _stop(active)
        names = ", ".join(child.run.name for child in active) or "no run was running"
        raise RunStopped(f"interrupted; stopped {names}; run the same command again to resume") from None
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        bar.close()
    return outcomes


def _stop(children: list[_Child]) -> None:
    """SIGTERM to every running run's process group, SIGKILL to what has not ended after STOP_WAIT_S;
    further Ctrl-C's are ignored meanwhile, so no run is left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for child in children:
        child.stop(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.stop(signal.SIGKILL)
            child.process.wait()
        child.outcome()  # closes its log


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def summary_table(runs: list[Run], outcomes: dict[str, Outcome]) -> str:
    """variant, seed, wall time and status of every run; the statuses left-aligned (they are words)."""
    width = max(len("status"), *(len(outcomes[run.name].status) for run in runs))
    rows = [
        [run.variant, str(run.seed), _duration(outcomes[run.name].seconds), outcomes[run.name].status.ljust(width)]
        for run in runs
    ]
    table = format_table(rows, ["variant", "seed", "wall time", "status".ljust(width)])
    return "\n".join(line.rstrip() for line in table.splitlines())


def run_sweep(
    sweep: Sweep, parallel: int = 1, rerun_changed: bool = False, tables_only: bool = False, command: str = ""
) -> None:
    """Plan and check every run, train what is left (unless `tables_only`), then write the tables
    of the finished runs. Raises RunStopped (exit status 1) after the tables when any run failed."""
    runs = plan_runs(sweep)
    decide(runs, rerun_changed)
    outcomes: dict[str, Outcome] = {}
    if not tables_only:
        outcomes = execute(sweep, runs, parallel)
        print("\n" + summary_table(runs, outcomes))
    results, missing = collect_results(runs)
    write_tables(sweep, results, missing, command, run_costs(runs))
    plots = write_plots(sweep, results, runs)
    print(
        f"tables of {len(results)} of {len(runs)} runs: {sweep.output_dir / 'results.md'}, "
        f"{sweep.output_dir / 'results.csv'}" + "".join(f", {path}" for path in plots)
    )
    failed = [run for run in runs if run.name in outcomes and outcomes[run.name].failed]
    if failed:
        raise RunStopped(
            f"{len(failed)} of {len(runs)} runs failed: " + "; ".join(f"{run.name} (log: {run.log})" for run in failed)
        )


# ---------------------------------------------------------------- the tables
Results = dict[tuple[str, int], list[CaseRow]]  # (variant, seed) -> its test cases


def collect_results(runs: list[Run]) -> tuple[Results, list[str]]:
    """Each finished run's test cases, and for every other run why it is not in the tables."""
    results, missing = {}, []
    for run in runs:
        cases = run.folder / CASES_FILE
        if not (run.folder / SUMMARY_FILE).is_file():
            missing.append(f"{run.name} (not finished)")
        elif not cases.is_file():
            missing.append(f"{run.name} (finished without {CASES_FILE}: an older lightning-fl fit)")
        else:
            results[(run.variant, run.seed)] = read_test_cases(cases)
    return results, missing


def run_costs(runs: list[Run]) -> dict[tuple[str, int], dict[str, Any]]:
    """What each finished run cost, from its summary.json: wall time, time per round, device, precision."""
    costs = {}
    for run in runs:
        path = run.folder / SUMMARY_FILE
        if path.is_file():
            summary = json.loads(path.read_text())
            rounds = summary.get("round_time_s") or [math.nan]
            costs[(run.variant, run.seed)] = {
                "wall_s": summary.get("wall_time_s", math.nan),
                "round_s": sum(rounds) / len(rounds),
                "device": summary.get("device", "not recorded"),
                "precision": summary.get("precision", "not recorded"),
            }
    return costs


def _time_table(sweep: Sweep, costs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Per variant: minutes per run and seconds per round (mean over its seeds), where and how it ran."""
    rows = []
    for variant in sweep.variants:
        mine = [c for (v, _), c in costs.items() if v == variant]
        if mine:
            rows.append(
                [
                    variant,
                    str(len(mine)),
                    f"{_mean([c['wall_s'] for c in mine]) / 60:.1f}",
                    f"{_mean([c['round_s'] for c in mine]):.1f}",
                    "; ".join(sorted({f"{c['device']}, {c['precision']}" for c in mine})),
                ]
            )
    return _markdown(["variant", "runs", "min per run", "s per round", "device, precision"], rows) if rows else []


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def results_csv(results: Results) -> str:
    """One row per run × phase × model × site × class: the mean Dice over the cases that have the
    class, and how many they are."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for (variant, seed), rows in results.items():
        for row in rows:
            values = groups.setdefault((variant, seed, row.phase, row.model, row.site, row.cls), [])
            if row.dice is not None:
                values.append(row.dice)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for key, values in groups.items():
        writer.writerow([*key, repr(_mean(values)) if values else "", len(values)])
    return out.getvalue()


def _ordered(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _class_means(rows: list[CaseRow], phase: str, site: str | None = None) -> dict[str, float]:
    """Mean Dice over the cases per class (pooled over the sites that label it)."""
    return {cls: _mean(v) for cls, v in pooled(rows, phase, site).items()}


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(line) + " |" for line in lines] + [""]


def _seed_table(sweep: Sweep, per_run: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """Rows = classes (in the order the runs list them) and their mean; columns = variants."""
    classes = _ordered(cls for means in per_run.values() for cls in means)
    variants = list(sweep.variants)

    def over_seeds(variant: str, value: Any) -> str:
        return mean_std(value(per_run[(variant, seed)]) for seed in sweep.seeds if (variant, seed) in per_run)

    rows = [[cls, *(over_seeds(v, lambda m, c=cls: m.get(c, math.nan)) for v in variants)] for cls in classes]
    rows.append(["mean", *(over_seeds(v, run_mean) for v in variants)])
    return _markdown(["class", *variants], rows)


def _cross_site(results: Results, variant: str) -> list[str]:
    """A standalone variant's every model on every site's test split and class, mean over seeds."""
    runs = [[row for row in rows if row.phase == TEST] for (v, _), rows in results.items() if v == variant]
    models = _ordered(row.model for rows in runs for row in rows)
    columns = _ordered((row.site, row.cls) for rows in runs for row in rows)
    over_seeds: dict[tuple[str, str, str], list[float]] = {}
    for rows in runs:
        per_run: dict[tuple[str, str, str], list[float]] = {}
        for row in rows:
            if row.dice is not None:
                per_run.setdefault((row.model, row.site, row.cls), []).append(row.dice)
        for key, values in per_run.items():
            over_seeds.setdefault(key, []).append(_mean(values))
    table = [
        [
            model,
            *(
                f"{np.mean(over_seeds[(model, site, cls)]):.3f}" if (model, site, cls) in over_seeds else "n/a"
                for site, cls in columns
            ),
        ]
        for model in models
    ]
    return _markdown(["model \\ site/class", *(f"{site}/{cls}" for site, cls in columns)], table)


def bootstrap_mean(
    values: Sequence[float],
    clusters: Sequence[Any] | None = None,
    resamples: int = RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """The mean of `values` and its percentile bootstrap interval at `level`: the cases
    (`clusters`, one per value by default) are resampled with replacement, each with all its values,
    so that the classes and seeds of one case count as the one case they are. Reproducible: a fixed seed."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        raise ValueError("bootstrap_mean needs at least one value")
    keys = list(range(len(values))) if clusters is None else list(clusters)
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    index = np.array([ids[key] for key in keys])
    sums, counts = np.bincount(index, weights=values), np.bincount(index).astype(float)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 × cases
        draws = rng.integers(0, len(sums), size=(min(1000, resamples - start), len(sums)))
        means.append(sums[draws].sum(axis=1) / counts[draws].sum(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def _case_scores(results: Results, variant: str) -> dict[tuple[int, str, str, str, str], float]:
    """(seed, phase, site, case, class) → the Dice of the variant's headline model (the mean, should
    several models score it)."""
    scores: dict[tuple[int, str, str, str, str], list[float]] = {}
    for (v, seed), rows in results.items():
        if v == variant:
            for row in headline_rows(rows):
                if row.dice is not None:
                    scores.setdefault((seed, row.phase, row.site, row.case, row.cls), []).append(row.dice)
    return {key: _mean(values) for key, values in scores.items()}


class Difference(NamedTuple):
    """a − b over one class (or all) of the test splits or of one external site."""

    group: str  # "test" or "external: <site>"
    cls: str  # a class, or ALL_CLASSES
    n: int  # paired values (case × class × seed)
    cases: int  # distinct cases (site, case)
    mean: float
    low: float
    high: float


def paired_differences(results: Results, a: str, b: str) -> list[Difference]:
    """a − b over the cases both scored (same seed, phase, site, case and class, Dice in both), per
    class and over all classes, for the test splits and each external site."""
    scores_a, scores_b = _case_scores(results, a), _case_scores(results, b)
    groups: dict[tuple[str, str], list[tuple[float, tuple[str, str]]]] = {}
    for key, value in scores_a.items():
        if key in scores_b:
            _, phase, site, case, cls = key
            group = TEST if phase == TEST else f"{EXTERNAL}: {site}"
            pair = (value - scores_b[key], (site, case))
            groups.setdefault((group, cls), []).append(pair)
            groups.setdefault((group, ALL_CLASSES), []).append(pair)
    ordered = [
        key
        for group in _ordered(g for g, _ in groups)
        for key in [*(k for k in groups if k[0] == group and k[1] != ALL_CLASSES), (group, ALL_CLASSES)]
    ]
    differences = []
    for group, cls in ordered:
        diffs, clusters = zip(*groups[(group, cls)])
        differences.append(Difference(group, cls, len(diffs), len(set(clusters)), *bootstrap_mean(diffs, clusters)))
    return differences


def _signed(value: float) -> str:
    """+0.012 / -0.012, and +0.000 rather than a rounding's -0.000."""
    return f"{round(value, 3) + 0.0:+.3f}"


def _shown(path: Path) -> Path:
    """A path as the tables show it: relative to the repository where it lies inside, so committed
    tables do not name one machine's folders."""
    resolved = path.resolve()
    return resolved.relative_to(CONFIG_DIR.parent) if resolved.is_relative_to(CONFIG_DIR.parent) else path


def results_markdown(
    sweep: Sweep,
    results: Results,
    missing: list[str],
    command: str,
    costs: dict[tuple[str, int], dict[str, Any]] | None = None,
) -> str:
    """The sweep's `results.md`: what ran and how, then its tables (test, external, cross-site, time,
    paired differences)."""
    headline = {key: headline_rows(rows) for key, rows in results.items()}
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"- sweep file: `{_shown(sweep.path)}`",
        f"- base config: `{_shown(sweep.base)}`",
        f"- seeds: {', '.join(map(str, sweep.seeds))}",
        f"- overrides of every variant: {' '.join(sweep.overrides) or 'none'}",
        *(f"- variant `{name}`: {' '.join(own) or '(the base config)'}" for name, own in sweep.variants.items()),
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- command: `{command}`",
        f"- runs in these tables: {len(results)} of {len(sweep.seeds) * len(sweep.variants)}"
        + (f"; not: {'; '.join(missing)}" if missing else ""),
        "",
        "Cells: each run's mean Dice over the cases, then mean ± sample std over seeds (3 decimals; one seed: the "
        "mean). The mean row averages each run's classes first.",
        "",
        "## Test",
        "",
        "Each class at the sites that label it (the global model; standalone variants: each site's own model on "
        "its own site).",
        "",
        *_seed_table(sweep, {key: _class_means(rows, TEST) for key, rows in headline.items()}),
    ]
    for site in _ordered(r.site for rows in headline.values() for r in rows if r.phase == EXTERNAL):
        lines += [
            f"## external: {site}",
            "",
            "Per organ (standalone variants: each organ by the models of the sites that label it).",
            "",
            *_seed_table(sweep, {key: _class_means(rows, EXTERNAL, site) for key, rows in headline.items()}),
        ]
    for variant in sweep.variants:
        runs = [rows for (v, _), rows in results.items() if v == variant]
        if runs and not any(r.model == GLOBAL for rows in runs for r in rows):
            lines += [
                f"## cross-site: {variant}",
                "",
                "Each site's model (rows) on each site's test split and class (columns), mean over seeds: "
                "a site's model has not learnt what its site never labelled.",
                "",
                *_cross_site(results, variant),
            ]
    if costs:
        lines += [
            "## Time",
            "",
            "Wall time of each run (training, validation and test) and of a round, mean over "
            "the seeds; the device and precision each ran on.",
            "",
            *_time_table(sweep, costs),
        ]
    if sweep.comparisons:
        resamples = f"{RESAMPLES:,}".replace(",", " ")
        lines += [
            "## Paired differences",
            "",
            "Over the cases both variants scored (same seed, site, case and class, Dice in both; the models of "
            f"the tables above): the mean per-case difference and its 95 % percentile bootstrap interval "
            f"({resamples} resamples of the cases with replacement, each with all its classes and seeds; numpy "
            f"seed {BOOTSTRAP_SEED}); n = paired values (case × class × seed).",
            "",
        ]
        for a, b in sweep.comparisons:
            rows = [
                [d.group, d.cls, str(d.n), str(d.cases), _signed(d.mean), f"[{_signed(d.low)}, {_signed(d.high)}]"]
                for d in paired_differences(results, a, b)
            ]
            lines += [f"### {a} − {b}", ""]
            lines += (
                _markdown(["phase", "class", "n", "cases", f"{a} − {b}", "95 % CI"], rows)
                if rows
                else ["No case was scored by both.", ""]
            )
    return "\n".join(lines)


def write_tables(
    sweep: Sweep, results: Results, missing: list[str], command: str, costs: dict[tuple[str, int], dict[str, Any]]
) -> None:
    """Write the sweep's `results.csv` and `results.md` into its output folder."""
    atomic_write_text(sweep.output_dir / "results.csv", results_csv(results))
    atomic_write_text(sweep.output_dir / "results.md", results_markdown(sweep, results, missing, command, costs))


def write_plots(sweep: Sweep, results: Results, runs: list[Run]) -> list[Path]:
    """`comparison.png` beside results.md: its test table (the same rows) as bars, mean ± std over
    seeds; `aggregation_frequency.png` where the finished variants differ in fl.local_steps. The paths written."""
    if not results:
        return []
    per_run = {key: _class_means(headline_rows(rows), TEST) for key, rows in results.items()}
    variants = [v for v in sweep.variants if any(key[0] == v for key in per_run)]
    figures = {COMPARISON_PLOT: comparison_figure(variants, per_run)}
    points = frequency_points({run.variant: run.cfg for run in runs}, per_run)
    if len({s for by_steps in points.values() for s in by_steps}) > 1:
        figures[FREQUENCY_PLOT] = frequency_figure(points)
    return [write_png(sweep.output_dir / name, fig) for name, fig in figures.items()]
