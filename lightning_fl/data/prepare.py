"""Published datasets → one site's folder and datalist in the unified label space (spec §1).

`lightning-fl prepare-data --task liver --src Task03_Liver --dst DIR` reads a dataset in its own
published layout (MSD, KiTS19, AMOS22; `configs/prepare/tasks.yaml` says which task uses which and how
its label values map to unified classes), copies the images unchanged, writes remapped uint8 labels
on the same grid, and a datalist with training/validation/testing splits (seeded 60/20/20, or the
splits of an existing datalist). Everything is built in a hidden folder and renamed into place, so
a failed run never leaves a half-written destination.
"""

from __future__ import annotations

import json
import re
import shutil
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
from lightning_fl.data.validation import grid_mismatch
from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelMap, LabelSpace

TASKS_FILE = CONFIG_DIR / "prepare" / "tasks.yaml"
LAYOUTS = ("msd", "kits19", "amos")
AMOS_LAST_CT = 500  # AMOS22 numbers its CT cases 1–500 and its MRI cases above


@dataclass
class TaskConfig:
    layout: Optional[str] = "msd"  # null: a label scheme for `evaluate --label-map` only
    labels: dict[int, str] = field(default_factory=dict)  # native value -> unified class name
    background: list[int] = field(default_factory=list)  # other native values, drawn as background
    unlisted: str = "error"  # any value not listed above: "error" or "background"
    external: bool = False  # a test-only site (every case goes to "testing"), scored per organ

    def label_map(self, name: str, labels: LabelSpace, where: str) -> LabelMap:
        """These native label values in the unified label space."""
        values = {int(k): labels.index(v, where=where) for k, v in self.labels.items()}
        return LabelMap(name, values, frozenset(self.background), self.unlisted == "background", per_organ=self.external)


@dataclass
class Case:
    name: str  # file name stem, unique within the task
    image: Path
    label: Path


def load_task(task: str, tasks_file: Path = TASKS_FILE) -> TaskConfig:
    try:
        tasks = OmegaConf.load(tasks_file).tasks
        if task not in tasks:
            raise ConfigError(f"unknown task '{task}'; {tasks_file} defines {sorted(tasks)}")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), tasks[task]))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{tasks_file}: task '{task}': {str(err).splitlines()[0]}") from err
    if cfg.layout not in LAYOUTS + (None,):
        raise ConfigError(f"{tasks_file}: task '{task}': layout must be one of {list(LAYOUTS)} or null, got '{cfg.layout}'")
    if cfg.unlisted not in ("error", "background"):
        raise ConfigError(f"{tasks_file}: task '{task}': unlisted must be 'error' or 'background', got '{cfg.unlisted}'")
    return cfg


def label_map(task: str, labels: LabelSpace, tasks_file: Path = TASKS_FILE) -> LabelMap:
    return load_task(task, tasks_file).label_map(task, labels, where=f"{tasks_file} task '{task}'")


def find_cases(src: Path, layout: str) -> list[Case]:
    """Every labelled case of a dataset in its published layout."""
    if not src.is_dir():
        raise DatalistError(f"--src {src} is not a folder")
    if layout == "kits19":
        cases = [Case(d.name, d / "imaging.nii.gz", d / "segmentation.nii.gz")
                 for d in sorted(src.glob("case_*")) if (d / "segmentation.nii.gz").exists()]
    else:
        manifest = src / "dataset.json"
        if not manifest.is_file():
            raise DatalistError(f"{manifest} not found: an {layout.upper()} dataset folder has a dataset.json")
        content = json.loads(manifest.read_text())
        lists = ["training"] + (["validation"] if layout == "amos" else [])
        entries = [e for key in lists for e in content.get(key, []) if isinstance(e, dict) and "label" in e]
        cases = [Case(nifti_stem(e["image"]), src / e["image"], src / e["label"]) for e in entries]
        if layout == "amos":  # CT only
            cases = [c for c in cases if int(re.sub(r"\D", "", c.name) or 0) <= AMOS_LAST_CT]
    if not cases:
        raise DatalistError(f"--src {src}: no labelled cases found in the {layout} layout")
    return cases


def split_cases(names: list[str], seed: int, datalist: Path | None, external: bool) -> dict[str, list[str]]:
    """training/validation/testing case names: a given datalist's splits, else seeded 60/20/20."""
    if external:
        return {"testing": sorted(names)}
    if datalist is not None:
        content = json.loads(datalist.read_text())
        splits = {key: [nifti_stem(e["image"] if isinstance(e, dict) else e) for e in content.get(key, [])]
                  for key in ("training", "validation", "testing")}
        unknown = sorted(set(sum(splits.values(), [])) - set(names))
        if unknown:
            raise DatalistError(f"--datalist {datalist}: cases not in --src: {unknown[:5]}")
        return splits
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    train, val = round(0.6 * len(order)), round(0.2 * len(order))
    return {"training": order[:train], "validation": order[train:train + val], "testing": order[train + val:]}


def remap_label(case: Case, mapping: LabelMap) -> nib.Nifti1Image:
    """The case's label in unified classes, on the image's grid; unknown values and grids are errors."""
    for path in (case.image, case.label):
        if not path.is_file():
            raise DatalistError(f"case '{case.name}': file not found: {path}")
    image, label = nib.load(case.image), nib.load(case.label)
    mismatch = grid_mismatch(image, label)
    if mismatch:
        raise DatalistError(f"case '{case.name}': {case.label} is not on the grid of {case.image} ({mismatch})")
    values = np.asanyarray(label.dataobj).astype(np.int64)
    unexpected = mapping.unexpected(values)
    if unexpected:
        raise DatalistError(f"case '{case.name}': {case.label} has label values {unexpected} that the task does not map")
    remapped = nib.Nifti1Image(mapping.apply(values), label.affine, label.header)
    remapped.set_data_dtype(np.uint8)
    return remapped


def prepare_task(task: str, src: Path, dst: Path, labels: LabelSpace, seed: int = 0,
                 datalist: Path | None = None, tasks_file: Path = TASKS_FILE, progress: bool = False) -> Path:
    """Write `dst/<task>/` and `dst/<task>.json`; returns the datalist path."""
    cfg = load_task(task, tasks_file)
    if cfg.layout is None:
        raise ConfigError(f"{tasks_file}: task '{task}' is a label scheme for `evaluate --label-map`, not a dataset layout")
    mapping = cfg.label_map(task, labels, where=f"{tasks_file} task '{task}'")
    folder, listing = dst / task, dst / f"{task}.json"
    for path in (folder, listing):
        if path.exists():
            raise FileExistsError(f"{path} already exists; delete it or choose another --dst")
    cases = {c.name: c for c in find_cases(src, cfg.layout)}
    splits = split_cases(sorted(cases), seed, datalist, cfg.external)
    tmp = dst.parent / f".{dst.name}.{task}.prepare-tmp"  # beside dst: nothing appears in dst until the end
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out: dict[str, list[dict[str, str]]] = {key: [] for key in splits}
        todo = [(key, name) for key, names in splits.items() for name in names]
        for key, name in tqdm(todo, desc=f"prepare {task}", unit="case", disable=None if progress else True):
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
