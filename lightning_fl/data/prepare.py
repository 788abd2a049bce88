"""Published datasets → one site's folder and datalist in the unified label space
(`docs/explanation/label-space.md`).

`lightning-fl prepare-data --task liver --src Task03_Liver --dst DIR` reads a dataset in its own
published layout (MSD, KiTS19, AMOS22; `configs/prepare/tasks.yaml` says which task uses which and how
its label values map to unified classes), copies the images unchanged, writes remapped uint8 labels
on the same grid, and a datalist with training/validation/testing splits (seeded 60/20/20, or the
splits of an existing datalist). Every source case first passes the checks every command applies
(`validation.check_cases`: a fractional label value is refused, never rounded), so one bad case
stops the run before anything is written; everything is then built in a hidden folder and renamed
into place, so a failed run never leaves a half-written destination.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from lightning_fl.config import CONFIG_DIR, ConfigError
from lightning_fl.data.datasets import nifti_stem
from lightning_fl.data.validation import (
    SPLITS,
    CaseFiles,
    DataCheckError,
    check_cases,
    check_datalist,
    entry_problem,
    json_kind,
    read_json,
)
from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelMap, LabelSpace

TASKS_FILE = CONFIG_DIR / "prepare" / "tasks.yaml"
LAYOUTS = ("msd", "kits19", "amos")
AMOS_LAST_CT = 500  # AMOS22 numbers its CT cases 1–500 and its MRI cases above


@dataclass
class TaskConfig:
    """One task of `configs/prepare/tasks.yaml`: a published dataset's layout and label values."""

    layout: Optional[str] = "msd"  # null: a label scheme for `evaluate --label-map` only
    labels: dict[int, str] = field(default_factory=dict)  # native value -> unified class name
    background: list[int] = field(default_factory=list)  # other native values, drawn as background
    unlisted: str = "error"  # any value not listed above: "error" or "background"
    external: bool = False  # a test-only site (every case goes to "testing"), scored per organ

    def label_map(self, name: str, labels: LabelSpace, where: str) -> LabelMap:
        """These native label values in the unified label space."""
        values = {int(k): labels.index(v, where=where) for k, v in self.labels.items()}
        return LabelMap(
            name, values, frozenset(self.background), self.unlisted == "background", per_organ=self.external
        )


@dataclass
class Case:
    """One source case of a published dataset: its image and label files."""

    name: str  # file name stem, unique within the task
    image: Path
    label: Path


def load_task(task: str, tasks_file: Path = TASKS_FILE) -> TaskConfig:
    """The task's entry of `tasks_file`, checked; an unknown task or a malformed entry is a `ConfigError`."""
    try:
        tasks = OmegaConf.load(tasks_file).tasks
        if task not in tasks:
            raise ConfigError(f"unknown task '{task}'; {tasks_file} defines {sorted(tasks)}")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), tasks[task]))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{tasks_file}: task '{task}': {str(err).splitlines()[0]}") from err
    if cfg.layout not in LAYOUTS + (None,):
        raise ConfigError(
            f"{tasks_file}: task '{task}': layout must be one of {list(LAYOUTS)} or null, got '{cfg.layout}'"
        )
    if cfg.unlisted not in ("error", "background"):
        raise ConfigError(
            f"{tasks_file}: task '{task}': unlisted must be 'error' or 'background', got '{cfg.unlisted}'"
        )
    return cfg


def label_map(task: str, labels: LabelSpace, tasks_file: Path = TASKS_FILE) -> LabelMap:
    """The task's native label values mapped into the unified label space `labels`."""
    return load_task(task, tasks_file).label_map(task, labels, where=f"{tasks_file} task '{task}'")


def find_cases(src: Path, layout: str) -> list[Case]:
    """Every labelled case of a dataset in its published layout."""
    if not src.is_dir():
        raise DatalistError(f"--src {src} is not a folder")
    if layout == "kits19":
        cases = [
            Case(d.name, d / "imaging.nii.gz", d / "segmentation.nii.gz")
            for d in sorted(src.glob("case_*"))
            if (d / "segmentation.nii.gz").exists()
        ]
    else:
        manifest = src / "dataset.json"
        if not manifest.is_file():
            raise DatalistError(f"{manifest} not found: an {layout.upper()} dataset folder has a dataset.json")
        lists = ["training"] + (["validation"] if layout == "amos" else [])  # the labelled cases; not "test"
        entries, problems = check_datalist(manifest, lists)
        if problems:
            raise DataCheckError(problems)
        cases = [
            Case(nifti_stem(e["image"]), Path(e["image"]), Path(e["label"]))
            for items in entries.values()
            for e in items
        ]
        if layout == "amos":  # CT only
            cases = [c for c in cases if int(re.sub(r"\D", "", c.name) or 0) <= AMOS_LAST_CT]
    if not cases:
        raise DatalistError(f"--src {src}: no labelled cases found in the {layout} layout")
    twice = sorted(name for name, n in Counter(c.name for c in cases).items() if n > 1)
    if twice:
        raise DatalistError(
            f"--src {src}: cases whose images share a file name {twice[:5]}; each case needs its own name"
        )
    return cases


def split_cases(names: list[str], seed: int, datalist: Path | None, external: bool) -> dict[str, list[str]]:
    """training/validation/testing case names: a given datalist's splits, else seeded 60/20/20."""
    if external:
        return {"testing": sorted(names)}
    if datalist is not None:
        splits = _given_splits(datalist)
        listed = sum(splits.values(), [])
        unknown = sorted(set(listed) - set(names))
        if unknown:
            raise DatalistError(f"--datalist {datalist}: cases not in --src: {unknown[:5]}")
        twice = sorted(name for name, n in Counter(listed).items() if n > 1)
        if twice:
            raise DatalistError(
                f"--datalist {datalist}: cases listed more than once {twice[:5]}; each case belongs in one split"
            )
        return splits
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    train, val = round(0.6 * len(order)), round(0.2 * len(order))
    return {"training": order[:train], "validation": order[train : train + val], "testing": order[train + val :]}


def _given_splits(datalist: Path) -> dict[str, list[str]]:
    """The case names of each split of an existing datalist: entries with an "image", or file or case names."""
    content = read_json(datalist)
    if not isinstance(content, dict):
        raise DatalistError(
            f"--datalist {datalist}: expected a JSON object with {list(SPLITS)} lists, got {json_kind(content)}"
        )
    splits: dict[str, list[str]] = {}
    for key in SPLITS:
        items = content.get(key, [])
        if not isinstance(items, list):
            raise DatalistError(f"--datalist {datalist}: '{key}' must be a list of cases, got {json_kind(items)}")
        for i, item in enumerate(items):
            if not (isinstance(item, str) and item) and (problem := entry_problem(item, ("image",))):
                raise DatalistError(f"--datalist {datalist}: {key}[{i}]: {problem}, or a case name")
        splits[key] = [nifti_stem(item if isinstance(item, str) else item["image"]) for item in items]
    return splits


def remap_label(case: Case, mapping: LabelMap) -> nib.Nifti1Image:
    """The case's label in unified classes; `check_cases` has made sure it holds whole numbers the
    map lists, on the image's grid."""
    label = nib.load(case.label)
    remapped = nib.Nifti1Image(mapping.apply(np.asanyarray(label.dataobj).astype(np.int64)), label.affine, label.header)
    remapped.set_data_dtype(np.uint8)
    remapped.header.set_slope_inter(1, 0)  # the classes are stored as they are, whatever the source's scaling
    return remapped


def prepare_task(
    task: str,
    src: Path,
    dst: Path,
    labels: LabelSpace,
    seed: int = 0,
    datalist: Path | None = None,
    tasks_file: Path = TASKS_FILE,
    progress: bool = False,
) -> Path:
    """Write `dst/<task>/` and `dst/<task>.json`; returns the datalist path. Every source case is
    checked first (`validation.check_cases`): one bad case and nothing is written."""
    cfg = load_task(task, tasks_file)
    if cfg.layout is None:
        raise ConfigError(
            f"{tasks_file}: task '{task}' is a label scheme for `evaluate --label-map`, not a dataset layout"
        )
    mapping = cfg.label_map(task, labels, where=f"{tasks_file} task '{task}'")
    folder, listing = dst / task, dst / f"{task}.json"
    for path in (folder, listing):
        if path.exists():
            raise FileExistsError(f"{path} already exists; delete it or choose another --dst")
    cases = {c.name: c for c in find_cases(src, cfg.layout)}
    splits = split_cases(sorted(cases), seed, datalist, cfg.external)
    todo = [(key, name) for key, names in splits.items() for name in names]
    bar = dict(unit="case", total=len(todo), disable=None if progress else True)
    checked = (CaseFiles(f"case '{name}'", key, cases[name].image, cases[name].label) for key, name in todo)
    problems = check_cases(f"task '{task}'", tqdm(checked, desc=f"check {task}", **bar), allowed=None, mapping=mapping)
    if problems:
        raise DataCheckError(problems)
    tmp = dst.parent / f".{dst.name}.{task}.prepare-tmp"  # beside dst: nothing appears in dst until the end
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out: dict[str, list[dict[str, str]]] = {key: [] for key in splits}
        for key, name in tqdm(todo, desc=f"prepare {task}", **bar):
            case = cases[name]
            label = remap_label(case, mapping)
            suffix = ".nii.gz" if case.image.name.endswith(".gz") else ".nii"
            image_path = tmp / task / "images" / f"{name}{suffix}"  # KiTS19 names every image imaging.nii.gz
            label_path = tmp / task / "labels" / f"{name}.nii.gz"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(case.image, image_path)
            nib.save(label, label_path)
            out[key].append({"image": str(image_path.relative_to(tmp)), "label": str(label_path.relative_to(tmp))})
        (tmp / f"{task}.json").write_text(json.dumps({"name": task, **out}, indent=2) + "\n")
        dst.mkdir(parents=True, exist_ok=True)
        (tmp / task).rename(folder)
        (tmp / f"{task}.json").rename(listing)  # last: a datalist only ever points at complete data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return listing
