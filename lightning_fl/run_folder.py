"""A run folder and a sweep folder: the name of every file they hold, its reader and its atomic writer.

    <run>/config.yaml         the resolved config; its sha256 ties the checkpoints to it
    <run>/metrics.csv         one row per round, phase, site, model and class, appended as the run goes
    <run>/best.ckpt, last.ckpt   a model's weights (best_<site>.ckpt, last_<site>.ckpt: a standalone site's)
    <run>/state.ckpt          everything `fit --resume` needs, rewritten after every round
    <run>/summary.json        written when the run has been tested: the run is finished
    <run>/test_cases.csv      every model's Dice on every test and external case, per class
    <run>/resumes.yaml        when and with which config changes the run was resumed
    <run>/run.lock            held by the process writing the run
    <run>/*.png, <run>/wandb/ the run's plots and its W&B run

    <sweep>/runs/<variant>/seed<seed>/   a run folder, and seed<seed>.log beside it
    <sweep>/results.csv, results.md      the sweep's tables; comparison.png, aggregation_frequency.png

Rounds are numbered from 1 in every file (format 2). Files written before (format 1, no `format`
key, `fl.strategy` in config.yaml) counted from 0; each reader here upgrades them, so committed and
older run folders stay readable. No other module names a file of these folders.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from lightning_fl.checkpoint import (
    CheckpointError,
    OutputError,
    RunFolderError,
    atomic_write_text,
    file_sha256,
    load_model,
    move_aside,
    save_model,
    save_state,
    why_not_written,
)
from lightning_fl.config import load_config, to_yaml
from lightning_fl.errors import UserInputError

FORMAT = 2  # rounds numbered from 1 (format 1 counted from 0)

# phases: the `phase` column of metrics.csv and test_cases.csv
TRAIN, VALIDATION, TEST, EXTERNAL, DROPPED = "train", "validation", "test", "external", "dropped"
CLIPPED = "clipped"  # a site's outlying update, scaled down to the bound (fl.outlier_update=clip)
GLOBAL = "global"  # the model of a federated or centralized run (a standalone run has one per site)
LOCAL = "local"  # the model column of a site's training rows: the model it trained, before aggregation

# the teacher term's value under the method's name (condist, kd or pseudo_label), its weight w_r as condist_weight
LOSS_COLUMNS = ("loss", "supervised", "condist", "kd", "pseudo_label", "condist_weight", "proximal", "lr")
# skipped_steps: optimizer steps the float16 gradient scaler skipped in the round (16-mixed runs only)
METRICS_COLUMNS = ("round", "phase", "site", "model", "class", "dice") + LOSS_COLUMNS + ("skipped_steps", "note")
CASE_COLUMNS = ("phase", "model", "site", "case", "class", "dice")

DICE_PLOT, FINAL_PLOT, LOSS_PLOT, OVERLAY_PLOT = "dice_over_rounds.png", "final_dice.png", "losses.png", "overlays.png"
COMPARISON_PLOT, FREQUENCY_PLOT = "comparison.png", "aggregation_frequency.png"


class ResultsError(UserInputError):
    """A run-folder file that cannot be read back as what lightning-fl writes; the message names it."""


class CaseRow(NamedTuple):
    """One row of a run's test_cases.csv; dice is None where the class is absent from the case."""

    phase: str
    model: str
    site: str
    case: str
    cls: str
    dice: float | None


@dataclass(frozen=True)
class Identity:
    """Which run wrote a file (state.ckpt, the model files): a uuid made at its start, its
    config.yaml's sha256 and its seed."""

    run_id: str
    config_sha256: str
    seed: int

    @staticmethod
    def of(saved: dict[str, Any]) -> Identity:
        """The identity a file written with `dataclasses.asdict(identity)` holds."""
        return Identity(**{f.name: saved[f.name] for f in fields(Identity)})


class RunFolder:
    """Every file of one run's folder, with its reader and writer (all writes atomic)."""

    CONFIG, METRICS, SUMMARY, CASES = "config.yaml", "metrics.csv", "summary.json", "test_cases.csv"
    STATE, LOCK, RESUMES = "state.ckpt", "run.lock", "resumes.yaml"
    RECORD = (CONFIG, METRICS, SUMMARY, CASES)  # the run's record: also saved in its W&B run

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---------------------------------------------------------------- paths
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def cases(self) -> Path:
        return self.path / self.CASES

    @property
    def state(self) -> Path:
        return self.path / self.STATE

    @staticmethod
    def model_file(kind: str, model: str = GLOBAL) -> str:
        """`best.ckpt` / `last.ckpt` of the global model; `best_<site>.ckpt` of a standalone site's model."""
        return f"{kind}.ckpt" if model == GLOBAL else f"{kind}_{model}.ckpt"

    def model(self, kind: str, model: str = GLOBAL) -> Path:
        return self.path / self.model_file(kind, model)

    def plot(self, name: str) -> Path:
        return self.path / name

    @property
    def is_finished(self) -> bool:
        """Tested, its per-case scores and then its summary written whole (`fit`'s last steps): a
        damaged summary.json or test_cases.csv (`damage`) leaves the run to be tested again."""
        return self.summary.is_file() and self.damage() is None

    def damage(self, cfg: DictConfig | None = None) -> str | None:
        """Why the record of a tested run cannot be read back whole (summary.json or test_cases.csv
        missing, cut short or ill-typed), naming the file; None when both read. `cfg`: as `read_cases`."""
        try:
            self.read_record(cfg)
        except ResultsError as err:
            return str(err)
        return None

    def read_record(self, cfg: DictConfig | None = None) -> list[CaseRow]:
        """A tested run's per-case scores, once its summary.json and test_cases.csv have both read
        whole; a `ResultsError` names the file that does not. `cfg`: as `read_cases`."""
        self.read_summary()
        return self.read_cases(cfg)

    @property
    def has_state(self) -> bool:
        """It trained at least one round (it can be resumed)."""
        return self.state.is_file()

    def holds_finished_run(self, state: dict[str, Any], rounds: int) -> bool:
        """Its `state` (read from state.ckpt) is after the last of `rounds`, and the run was tested."""
        return state["round"] >= rounds and self.is_finished

    # ---------------------------------------------------------------- owning the folder
    def lock(self) -> FileLock:
        """Take the folder's `run.lock` at once, or refuse: two processes writing one run would mix it.
        The operating system releases the lock when its process ends, however it ends."""
        path = self.path / self.LOCK
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderError(
                f"{self.path} is in use: another lightning-fl fit is writing the run there "
                f"(it holds {path}); wait for it to end, or choose another output_dir"
            ) from None
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
        return lock

    def claim(self, overwrite: bool) -> tuple[FileLock, Path | None]:
        """Create and lock the folder of a new run. A folder that holds anything is refused, so that
        no run is replaced by mistake, or with `overwrite` moved aside (never deleted) if it is a run
        (it has config.yaml, the first file a run writes): returns the lock and where the old folder went."""
        aside = None
        if self.path.is_dir() and any(p.name != self.LOCK for p in self.path.iterdir()):  # a lock alone: nothing ran
            if not overwrite:
                raise RunFolderError(
                    f"output_dir {self.path} already holds files; pass --overwrite to move it aside (to "
                    f"{self.path}.replaced-<date-time>) and start a new run there, "
                    f"or fit --resume {self.path} to continue its run"
                )
            if not self.config.is_file():
                raise RunFolderError(
                    f"output_dir {self.path} holds files but no {self.CONFIG}, so it is not a run folder; "
                    "--overwrite moves only a run aside: choose another output_dir"
                )
            aside = self._move_aside()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the run folder {self.path}: {why_not_written(self.path, err)}") from err
        return self.lock(), aside

    def _move_aside(self) -> Path:
        """`move_aside` the folder, unless a run is writing there."""
        lock = self.lock()
        try:
            return move_aside(self.path)
        finally:
            lock.release()

    def remove_if_unused(self) -> None:
        """Remove the folder if it holds only its lock: a run that stopped before writing anything."""
        if self.path.is_dir() and [p.name for p in self.path.iterdir()] == [self.LOCK]:
            (self.path / self.LOCK).unlink()
            self.path.rmdir()

    # ---------------------------------------------------------------- config.yaml
    def write_config(self, cfg: DictConfig) -> Identity:
        """The run's resolved config (creating the folder), and the identity of the run it starts."""
        atomic_write_text(self.config, to_yaml(cfg))
        return Identity(uuid.uuid4().hex, file_sha256(self.config), cfg.seed)

    def update_config(self, cfg: DictConfig) -> None:
        """Replace config.yaml with the config a resume changed (resumes.yaml says what changed)."""
        atomic_write_text(self.config, to_yaml(cfg))

    def read_config(self) -> DictConfig:
        """The run's config.yaml, checked like any config file."""
        return load_config(self.config)

    # ---------------------------------------------------------------- model files and state.ckpt
    def save_model(self, kind: str, model: str, weights: dict[str, Any], **meta: Any) -> None:
        """A model file: its weights, with `round` (numbered from 1), score, classes, config and identity."""
        save_model(self.model(kind, model), weights, format=FORMAT, **meta)

    @staticmethod
    def model_round(saved: dict[str, Any]) -> int | None:
        """The round a loaded model file (or an export's metadata) was saved after, numbered from 1,
        where it says (files of format 1 counted from 0)."""
        saved_round = saved.get("round")
        return saved_round + 1 if saved_round is not None and saved.get("format", 1) == 1 else saved_round

    def save_state(self, state: dict[str, Any]) -> None:
        """state.ckpt: the resumable state after `state["round"]` (numbered from 1)."""
        save_state(self.state, {"format": FORMAT, **state})

    def read_state(self) -> dict[str, Any]:
        """state.ckpt, checked to be one that lightning-fl wrote; one of format 1 is upgraded."""
        state = load_model(self.state)
        if not isinstance(state, dict) or not {"round", "models", "metrics_bytes"} <= state.keys():
            raise CheckpointError(
                f"{self.state} is not a run state written by lightning-fl (expected its "
                "round, global model and metrics length)"
            )
        if state.get("format", 1) == 1:
            models = {
                model: {"state": saved["state"], "server": saved["strategy"], "best": saved["best"]}
                for model, saved in state["models"].items()
            }
            for saved in models.values():
                saved["best"]["round"] += 1
            state = state | {"format": FORMAT, "round": state["round"] + 1, "models": models}
        return state

    def check_same_run(self, state: dict[str, Any]) -> None:
        """Refuse to resume from a folder whose config.yaml or metrics.csv are not those of the run
        that saved its state.ckpt (another run started over it, a file replaced, edited or cut short):
        the resumed run would continue one run's model with another's config or lose rows of its metrics."""
        if "run_id" not in state:
            raise CheckpointError(
                f"{self.state} was written by an older lightning-fl that did not record which run it belongs to, so "
                "its config.yaml and metrics.csv cannot be checked against it; resume it with that version, or start "
                "a new run"
            )
        if file_sha256(self.config) != state["config_sha256"]:
            raise CheckpointError(
                f"{self.config} is not the config of run {state['run_id']}, which saved {self.state} (their sha256 "
                "differ): another run was started in this folder, which now mixes two runs and cannot be resumed"
            )
        recorded = state["metrics_bytes"]
        size = self.metrics.stat().st_size if self.metrics.is_file() else 0
        if size < recorded:
            raise CheckpointError(
                f"{self.metrics} has {size} bytes, {self.state} records {recorded}: rows of the rounds the "
                "checkpoint holds are missing, and resuming would lose them"
            )
        if file_sha256(self.metrics, recorded) != state["metrics_sha256"]:
            raise CheckpointError(
                f"{self.metrics}: its first {recorded} bytes are not the ones {self.state} records (their sha256 "
                "differ); it was rewritten or edited since"
            )

    def record_resume(self, after_round: int, changed: list[str], overrides: list[str]) -> None:
        """Append to `resumes.yaml` when, after which round and with which config changes the run was resumed."""
        path = self.path / self.RESUMES
        history = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        entry = {"after_round": after_round, "at": at, "changed": changed, "overrides": list(overrides)}
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(list(history) + [entry])))

    # ---------------------------------------------------------------- summary.json
    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: the run's last file; NaN (a class no test case contains) is written as null."""
        atomic_write_text(self.summary, json.dumps({"format": FORMAT, **_json_safe(summary)}, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """summary.json ({} where the run has none: cut off before its test); format 1 upgraded."""
        if not self.summary.is_file():
            return {}
        summary = _read_json(self.summary)
        if problem := _summary_problem(summary):
            raise ResultsError(f"{self.summary}: {problem}; the file is damaged (fit --resume {self.path} tests again)")
        if summary.get("format", 1) == 1:
            best = summary.get("best_round")
            if isinstance(best, int):
                summary["best_round"] = best + 1
            elif isinstance(best, dict):
                summary["best_round"] = {m: r + 1 for m, r in best.items()}
        return summary

    # ---------------------------------------------------------------- test_cases.csv
    def write_cases(self, rows: Iterable[CaseRow]) -> None:
        """test_cases.csv: an empty dice where the class is absent from the case."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CASE_COLUMNS)
        for row in rows:
            writer.writerow([*row[:-1], "" if row.dice is None else f"{row.dice:.8g}"])
        atomic_write_text(self.cases, out.getvalue())

    def read_cases(self, cfg: DictConfig | None = None) -> list[CaseRow]:
        """test_cases.csv, checked against the run's classes: the tables must not silently drop or
        misread a row. `cfg`: the run's config where the caller holds it already (composing
        config.yaml again costs more than reading the scores: a sweep's tables read it once a run)."""
        if not self.cases.is_file():
            raise ResultsError(
                f"{self.cases} not found: the run's per-case test scores (fit writes them when it tests)"
            )
        rows = read_cases(self.cases)
        classes = set((cfg or self.read_config()).labels.classes)
        if unknown := next((r for r in rows if r.cls not in classes), None):
            raise ResultsError(
                f"{self.cases}: class {unknown.cls!r} of case {unknown.case} is not one of the run's classes"
            )
        return rows

    # ---------------------------------------------------------------- metrics.csv
    def read_metrics(self) -> list[dict[str, str]]:
        """metrics.csv's rows as written (empty cells: ""; [] where there is none), rounds numbered
        from 1 (a format-1 file, whose first round is 0, is upgraded)."""
        if not self.metrics.is_file():
            return []
        with self.metrics.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if any(row["round"] == "0" for row in rows):
            rows = [row | {"round": str(int(row["round"]) + 1)} for row in rows]
        return rows


def read_cases(path: Path) -> list[CaseRow]:
    """A test_cases.csv, read whole and checked row by row (also the files of a downloaded W&B run):
    a file cut short, a row with a field missing or too many, an empty name or a Dice that is not a
    number in [0, 1] is refused, never read in part."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ResultsError(f"{path}: not the UTF-8 CSV lightning-fl writes ({err.reason})") from err
    if not text.endswith("\n"):  # write_cases ends every line, the last included
        raise ResultsError(f"{path}: its last line is cut short (no line end): the file is damaged")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or list(reader.fieldnames) != list(CASE_COLUMNS):
        raise ResultsError(f"{path}: expected the columns {','.join(CASE_COLUMNS)}, got {reader.fieldnames}")
    rows = []
    for line, row in enumerate(reader, start=2):
        if None in row or None in row.values():
            raise ResultsError(f"{path}: line {line}: expected the {len(CASE_COLUMNS)} fields {','.join(CASE_COLUMNS)}")
        if empty := [c for c in CASE_COLUMNS[:-1] if not row[c]]:
            raise ResultsError(f"{path}: line {line}: no {empty[0]}")
        try:
            dice = float(row["dice"]) if row["dice"] else None
        except ValueError:
            raise ResultsError(f"{path}: line {line}: dice {row['dice']!r} is not a number") from None
        if dice is not None and not 0 <= dice <= 1:
            raise ResultsError(f"{path}: line {line}: dice {row['dice']} is not in [0, 1]")
        rows.append(CaseRow(row["phase"], row["model"], row["site"], row["case"], row["class"], dice))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_dice(value: Any) -> bool:
    """A Dice as summary.json holds it: in [0, 1], or null (a class no case contains)."""
    return value is None or (_is_number(value) and 0 <= value <= 1)


def _is_per_model(value: Any, check: Any) -> bool:
    """`check(value)`, or a mapping of model → such a value (standalone runs: one per site's model)."""
    return check(value) or (isinstance(value, dict) and bool(value) and all(check(v) for v in value.values()))


def _dice_table(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_dice(v) for v in value.values())


SUMMARY_CHECKS: dict[str, tuple[str, Any]] = {
    "rounds": ("a whole number ≥ 1", lambda v: type(v) is int and v >= 1),
    "best_round": ("a round (per model)", lambda v: _is_per_model(v, lambda r: type(r) is int)),
    "best_validation_dice": ("a Dice (per model)", lambda v: _is_per_model(v, _is_dice)),
    "test_dice": ("a mapping of class → Dice", _dice_table),
    "test_mean_dice": ("a Dice", _is_dice),
    "external_dice": (
        "a mapping of site → class → Dice",
        lambda v: isinstance(v, dict) and all(_dice_table(t) for t in v.values()),
    ),
    "wall_time_s": ("a number of seconds", _is_number),
    "round_time_s": ("a list of seconds", lambda v: isinstance(v, list) and all(_is_number(t) for t in v)),
}


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """What in a read summary.json is not what fit writes: a key missing or of another type."""
    for key, (expected, check) in SUMMARY_CHECKS.items():
        if key not in summary:
            return f"no '{key}'"
        if not check(summary[key]):
            return f"'{key}' is {str(summary[key])[:40]!r}, expected {expected}"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not the JSON lightning-fl writes ({err})") from err
    if not isinstance(content, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _json_safe(value: Any) -> Any:
    """NaN becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


class SweepFolder:
    """A sweep's output folder: a run folder per variant × seed, each with its log, and the tables."""

    RUNS, RESULTS_CSV, RESULTS_MD, JOBS = "runs", "results.csv", "results.md", "jobs"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def run(self, variant: str, seed: int) -> RunFolder:
        return RunFolder(self.path / self.RUNS / variant / f"seed{seed}")

    def log(self, variant: str, seed: int) -> Path:
        """The run's stdout and stderr, beside its folder (it survives the folder being moved aside)."""
        return self.path / self.RUNS / variant / f"seed{seed}.log"

    @property
    def jobs(self) -> Path:
        """submitit's files of the runs' jobs (`sweep --launcher slurm`): scripts, pickles, job logs."""
        return self.path / self.JOBS

    @property
    def results_csv(self) -> Path:
        return self.path / self.RESULTS_CSV

    @property
    def results_md(self) -> Path:
        return self.path / self.RESULTS_MD

    def plot(self, name: str) -> Path:
        return self.path / name

    def runs(self) -> dict[tuple[str, int], RunFolder]:
        """(variant, seed) → its run folder, for every folder `runs/<variant>/seed<seed>/` there is."""
        return {
            (run.parent.name, int(run.name.removeprefix("seed"))): RunFolder(run)
            for run in sorted((self.path / self.RUNS).glob("*/seed*"))
            if run.is_dir() and run.name.removeprefix("seed").isdigit()
        }

    def tabulated(self) -> list[tuple[str, int]]:
        """The runs in the sweep's tables, in the sweep's order (results.csv's), each once."""
        if not self.results_csv.is_file():
            raise ResultsError(f"{self.results_csv} not found: the sweep has no tables yet")
        with self.results_csv.open(newline="", encoding="utf-8") as f:
            return list(dict.fromkeys((row["variant"], int(row["seed"])) for row in csv.DictReader(f)))
