"""Check a federation's data before training: every problem of every site, listed at once.

Hospitals' data is messy; a run that fails after an hour on case 87, or trains on a label value it
does not know, wastes a GPU day. `check_federation` reads each datalist and every image and label
once (headers and voxels) and reports, per site and case: missing or unreadable files, images that
are not 3D, image/label grids that differ (shape or affine), non-finite voxels, label values outside
the site's classes, empty splits, and the same image in two splits (identical voxels, whatever the file name).
`lightning-fl check-data` prints the report; `lightning-fl fit` runs it before training.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from lightning_fl.data.datasets import SPLITS
from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelSpace

AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Problem:
    site: str
    case: str  # "split[i] file name", or the datalist for problems of the whole file
    what: str

    def __str__(self) -> str:
        return f"site '{self.site}', {self.case}: {self.what}"


class DataCheckError(DatalistError):
    """The data has problems; the message lists every one of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} data problem(s) found:\n{lines}")


def _load(path: Path) -> tuple[nib.spatialimages.SpatialImage | None, str | None]:
    if not path.is_file():
        return None, f"file not found: {path}"
    try:
        return nib.load(path), None
    except Exception as err:  # noqa: BLE001 - nibabel raises several types for a bad header
        return None, f"unreadable ({type(err).__name__}: {err}): {path}"


def _voxels(image: nib.spatialimages.SpatialImage, path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asanyarray(image.dataobj), None
    except Exception as err:  # noqa: BLE001 - truncated or corrupt voxel data
        return None, f"unreadable voxel data ({type(err).__name__}: {err}): {path}"


def grid_mismatch(image: nib.spatialimages.SpatialImage, label: nib.spatialimages.SpatialImage) -> str | None:
    """Why a label is not on its image's voxel grid, or None when it is."""
    if image.shape != label.shape:
        return f"image shape {tuple(image.shape)} differs from label shape {tuple(label.shape)}"
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
        return "image and label affines differ (not the same voxel grid)"
    return None


def check_case(image_path: Path, label_path: Path, allowed: set[int]) -> tuple[list[str], str | None]:
    """Problems of one case, and a fingerprint of its image voxels (to find the same case twice)."""
    problems: list[str] = []
    image, error = _load(image_path)
    label, label_error = _load(label_path)
    problems += [e for e in (error, label_error) if e]
    if image is None or label is None:
        return problems, None
    for name, volume in (("image", image), ("label", label)):
        if len(volume.shape) != 3:
            problems.append(f"{name} is not a 3D volume: shape {tuple(volume.shape)}")
    if len(image.shape) == len(label.shape) == 3 and (problem := grid_mismatch(image, label)):
        problems.append(problem)
    image_voxels, error = _voxels(image, image_path)
    label_voxels, label_error = _voxels(label, label_path)
    problems += [e for e in (error, label_error) if e]
    fingerprint = None
    if image_voxels is not None:
        if np.issubdtype(image_voxels.dtype, np.floating) and not np.isfinite(image_voxels).all():
            problems.append(f"image has {int((~np.isfinite(image_voxels)).sum())} NaN or infinite voxels")
        fingerprint = hashlib.sha1(np.ascontiguousarray(image_voxels).tobytes()).hexdigest()
    if label_voxels is not None:
        if np.issubdtype(label_voxels.dtype, np.floating) and not np.isfinite(label_voxels).all():
            problems.append("label has NaN or infinite voxels")
        else:
            values = np.unique(label_voxels)
            unexpected = [v.item() for v in values if v not in allowed]
            if unexpected:
                problems.append(f"label values {unexpected[:10]} are not among the site's classes {sorted(allowed)}")
    return problems, fingerprint


def check_site(root: Path, site: DictConfig, labels: LabelSpace, splits: Sequence[str] = SPLITS) -> list[Problem]:
    datalist = root / site.datalist
    if not datalist.is_file():
        return [Problem(site.name, str(datalist), "datalist not found")]
    try:
        content = json.loads(datalist.read_text())
    except json.JSONDecodeError as err:
        return [Problem(site.name, str(datalist), f"not valid JSON: {err}")]
    allowed = {0} | set(labels.foreground(site.classes, where=f"site '{site.name}'"))
    problems: list[Problem] = []
    seen: dict[str, list[str]] = defaultdict(list)  # image voxel fingerprint -> where it occurs
    for split in splits:
        items = content.get(split)
        if not isinstance(items, list) or not items:
            problems.append(Problem(site.name, str(datalist), f"'{split}' is missing or empty"))
            continue
        for i, item in enumerate(items):
            where = f"{split}[{i}]"
            if not isinstance(item, dict) or not {"image", "label"} <= set(item):
                problems.append(Problem(site.name, where, "entry needs both 'image' and 'label'"))
                continue
            image, label = (datalist.parent / item[key] for key in ("image", "label"))
            where = f"{split}[{i}] {Path(item['image']).name}"
            case_problems, fingerprint = check_case(image, label, allowed)
            problems += [Problem(site.name, where, p) for p in case_problems]
            if fingerprint:
                seen[fingerprint].append(where)
    for places in seen.values():  # the same file listed twice, or a copy of it: identical voxels
        if len({place.split("[")[0] for place in places}) > 1:
            problems.append(Problem(site.name, " and ".join(places), "the same image is in several splits (a leak)"))
    return problems


def check_federation(root: Path, cfg: DictConfig, labels: LabelSpace) -> list[Problem]:
    """Every problem of every site (and of the external test sites), in config order."""
    problems: list[Problem] = []
    for site in cfg.data.sites:
        problems += check_site(root, site, labels)
    for site in cfg.data.external:
        problems += check_site(root, site, labels, splits=("testing",))
    return problems
