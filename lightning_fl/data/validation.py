"""One set of input checks for every command: datalists, images and labels, every problem at once.

Hospitals' data is messy; a run that fails after an hour on case 87, or trains on a label value it
does not know, wastes a GPU day. These checks read each datalist and every image and label once
(headers and voxels) and report, naming the file or case: datalists that are not UTF-8 JSON objects
of `{"image", "label"}` path entries, empty splits, missing or unreadable files, images that are not
real-valued 3D volumes, degenerate or non-finite affines, image/label grids that differ (shape or
affine), non-finite voxels, fractional label values or values outside the classes, and the same image
twice (identical voxels, whatever the file name) in one split or in several. `check-data` prints the
report and `fit` runs it before training; `prepare-data` and `evaluate` refuse such cases before
writing anything; `infer` skips such images.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelMap, LabelSpace

SPLITS = ("training", "validation", "testing")
CASE_KEYS = ("image", "label")
AFFINE_TOLERANCE_MM = 1e-3
MIN_ORTHOGONALITY = 1e-6  # |det| / product of the voxel sizes: 1 for orthogonal axes, 0 for a flat grid
MAX_EXTENT_MM = 3000.0  # no scan is 3 m across: beyond, the affine's units are wrong

Entries = dict[str, list[dict[str, str] | None]]  # split -> its entries, paths absolute; None: malformed


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, naming what lists the case, the case and what is wrong."""

    source: str  # what lists the case: "site 'liver'", "task 'spleen'", a datalist
    case: str  # "split[i] file name", "case 'name'", the datalist; "" for problems of the source itself
    what: str

    def __str__(self) -> str:
        return f"{self.source}, {self.case}: {self.what}" if self.case else f"{self.source}: {self.what}"


class DataCheckError(DatalistError):
    """The data has problems; the message is the one problem (one line), or a list of them all, one
    line each (a newline in a file name is escaped)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {printable(str(p))}" for p in self.problems)
        single = len(self.problems) == 1
        super().__init__(
            printable(str(self.problems[0])) if single else f"{len(self.problems)} data problem(s) found:\n{lines}"
        )


def printable(text: str) -> str:
    """`text` on one line: control characters (a newline or a tab in a file name) escaped as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class CaseFiles:
    """A case to check: how messages name it, the split it is in, its files."""

    where: str
    split: str
    image: Path
    label: Path


def is_file(path: Path) -> bool:
    """`path.is_file()`, False too for a name the system refuses (too long, say) rather than an OSError."""
    try:
        return path.is_file()
    except OSError:
        return False


def json_kind(value: Any) -> str:
    """How a message names a JSON value's type."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def read_json(path: Path) -> Any:
    """A user's JSON file; DatalistError naming it when it is missing, unreadable, not UTF-8 or not JSON."""
    content, problem = _parse_json(path)
    if problem:
        raise DatalistError(f"{path}: {problem}")
    return content


def _parse_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig")), None
    except FileNotFoundError:
        return None, "file not found"
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); expected a JSON file"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON: {err}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


def entry_problem(entry: Any, keys: Sequence[str] = CASE_KEYS) -> str | None:
    """Why a datalist entry is not an object with a file path (a non-empty string) under each of `keys`."""
    if not isinstance(entry, dict):
        return f"expected an object with {' and '.join(repr(k) for k in keys)}, got {json_kind(entry)}"
    for key in keys:
        if key not in entry:
            return f"'{key}' is missing"
        if not isinstance(entry[key], str) or not entry[key]:
            return f"'{key}' must be a file path (a non-empty string), got {json_kind(entry[key])}"
    return None


def check_datalist(
    path: Path, splits: Sequence[str] = SPLITS, source: str | None = None
) -> tuple[Entries, list[Problem]]:
    """Each split's entries, and every structural problem: the file missing or not UTF-8 JSON, not an
    object, a split missing, empty or not a list, an entry without an image and a label path. The
    problems name `source` (default: the datalist) and the datalist's entry."""

    def problem(where: str, what: str) -> Problem:
        return Problem(str(path), where, what) if source is None else Problem(source, f"{path} {where}".rstrip(), what)

    if not is_file(path):
        return {}, [problem("", "datalist not found")]
    content, parse_error = _parse_json(path)
    if parse_error:
        return {}, [problem("", parse_error)]
    wanted = "{'image', 'label'} entries"
    if not isinstance(content, dict):
        lists = ", ".join(repr(s) for s in splits)
        return {}, [problem("", f"expected a JSON object with {lists} lists of {wanted}, got {json_kind(content)}")]
    entries: Entries = {}
    problems: list[Problem] = []
    for split in splits:
        items = content.get(split)
        if not isinstance(items, list) or not items:
            got = (
                ""
                if isinstance(items, list)
                else " (it is missing)"
                if split not in content
                else f", got {json_kind(items)}"
            )
            problems.append(problem("", f"expected a non-empty '{split}' list of {wanted}{got}"))
            continue
        entries[split] = []
        for i, item in enumerate(items):
            if what := entry_problem(item):
                problems.append(problem(f"{split}[{i}]", what))
            entries[split].append(None if what else {key: str(path.parent / item[key]) for key in CASE_KEYS})
    return entries, problems


def datalist_cases(entries: Entries) -> list[CaseFiles]:
    """The well-formed entries as cases, named `split[i] image file name`."""
    return [
        CaseFiles(f"{split}[{i}] {Path(item['image']).name}", split, Path(item["image"]), Path(item["label"]))
        for split, items in entries.items()
        for i, item in enumerate(items)
        if item is not None
    ]


Volume = nib.spatialimages.SpatialImage


def _read(path: Path, name: str) -> tuple[Volume | None, np.ndarray | None, list[str]]:
    """The header and voxels of an image or label ("name"), or why they cannot be used: no such
    file, not NIfTI, not 3D, a degenerate or non-finite affine (no header then: its grid is
    meaningless), voxels that cannot be read or are not real numbers, non-finite voxels."""
    if not is_file(path):
        return None, None, [f"{name} file not found: {path}"]
    try:
        volume = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises several types for a bad header
        return None, None, [f"{name} unreadable ({type(err).__name__}: {_first_line(err)}): {path}"]
    if len(volume.shape) != 3:
        return None, None, [f"{name} is not a 3D volume: shape {tuple(volume.shape)}: {path}"]
    if problem := _affine_problem(volume.affine, volume.shape):
        return None, None, [f"{name} has {problem}: {path}"]
    try:
        voxels = np.asanyarray(volume.dataobj)
    except Exception as err:  # noqa: BLE001 - truncated or corrupt voxel data
        return volume, None, [f"{name} unreadable voxel data ({type(err).__name__}: {_first_line(err)}): {path}"]
    if not (np.issubdtype(voxels.dtype, np.integer) or np.issubdtype(voxels.dtype, np.floating)):
        return (
            volume,
            None,
            [f"{name} voxels are of type {voxels.dtype}; expected real numbers (integers or floats): {path}"],
        )
    if np.issubdtype(voxels.dtype, np.floating) and not np.isfinite(voxels).all():
        return volume, voxels, [f"{name} has {int((~np.isfinite(voxels)).sum())} NaN or infinite voxels: {path}"]
    return volume, voxels, []


def _first_line(err: Exception) -> str:
    return next(iter(str(err).splitlines()), "")


def _affine_problem(affine: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Why a voxel-to-mm matrix describes no usable grid: non-finite, a zero voxel size, axes that
    are not independent (a singular matrix), or a field of view no scan has (resampling it to the
    model's spacing would need more memory than any machine)."""
    if not np.isfinite(affine).all():
        return "a non-finite affine (NaN or infinite entries)"
    sizes = nib.affines.voxel_sizes(affine)
    if not sizes.all() or abs(np.linalg.det(affine[:3, :3])) < MIN_ORTHOGONALITY * np.prod(sizes):
        return (
            f"a degenerate affine (voxel sizes {[round(float(s), 4) for s in sizes]} mm, determinant "
            f"{np.linalg.det(affine[:3, :3]):.3g}); expected voxel sizes above 0 along three independent axes"
        )
    extent = sizes * np.array(shape)
    if extent.max() > MAX_EXTENT_MM:
        return (
            f"a field of view of {[round(float(e)) for e in extent]} mm; expected at most {MAX_EXTENT_MM:.0f} mm "
            "along each axis (are the voxel sizes in mm?)"
        )
    return None


def check_image(path: Path) -> tuple[Volume | None, list[str], str | None]:
    """An image's header, its problems, and a fingerprint of its voxels (to find the same case twice)."""
    image, voxels, problems = _read(path, "image")
    fingerprint = None if voxels is None else hashlib.sha1(np.ascontiguousarray(voxels).tobytes()).hexdigest()
    return image, problems, fingerprint


def check_label(
    path: Path, allowed: Collection[int] | None, mapping: LabelMap | None = None
) -> tuple[Volume | None, list[str]]:
    """A label's header and problems: it holds whole class numbers, among `allowed` (None: any)
    and, with a `mapping` from another label scheme, among the values it lists."""
    label, voxels, problems = _read(path, "label")
    if voxels is None or problems:
        return label, problems
    values = np.unique(voxels)
    fractional = values[values != np.round(values)]
    if fractional.size:
        count = int(np.isin(voxels, fractional).sum())
        return label, [
            f"label has {count} voxels of fractional values (e.g. {[round(float(v), 4) for v in fractional[:3]]}); "
            f"expected whole class numbers: {path}"
        ]
    values = values.astype(np.int64)
    if allowed is not None and (unexpected := [int(v) for v in values if v not in allowed]):
        problems.append(f"label values {unexpected[:10]} are not among the classes {sorted(allowed)}: {path}")
    if mapping is not None and (unmapped := mapping.unexpected(values)):
        problems.append(f"{path} has label values {unmapped[:10]} that the label map '{mapping.name}' does not list")
    return label, problems


def grid_mismatch(image: Volume, label: Volume) -> str | None:
    """Why a label is not on its image's voxel grid, or None when it is."""
    if image.shape != label.shape:
        return f"image shape {tuple(image.shape)} differs from label shape {tuple(label.shape)}"
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
        return "image and label affines differ (not the same voxel grid)"
    return None


def check_case(
    image_path: Path, label_path: Path, allowed: Collection[int] | None, mapping: LabelMap | None = None
) -> tuple[list[str], str | None]:
    """Problems of one case, and a fingerprint of its image voxels (to find the same case twice)."""
    image, problems, fingerprint = check_image(image_path)
    label, label_problems = check_label(label_path, allowed, mapping)
    problems += label_problems
    if image is not None and label is not None and (mismatch := grid_mismatch(image, label)):
        problems.append(mismatch)
    return problems, fingerprint


def check_cases(
    source: str, cases: Iterable[CaseFiles], allowed: Collection[int] | None, mapping: LabelMap | None = None
) -> list[Problem]:
    """Every problem of every case, then each image found more than once (identical voxels):
    twice in one split, or in several splits (a leak)."""
    problems: list[Problem] = []
    seen: dict[str, list[CaseFiles]] = defaultdict(list)
    for case in cases:
        case_problems, fingerprint = check_case(case.image, case.label, allowed, mapping)
        problems += [Problem(source, case.where, p) for p in case_problems]
        if fingerprint:
            seen[fingerprint].append(case)
    for places in (p for p in seen.values() if len(p) > 1):
        leak = len({p.split for p in places}) > 1
        what = (
            "the same image is in several splits (a leak)"
            if leak
            else "the same image is listed more than once in one split"
        )
        problems.append(Problem(source, " and ".join(p.where for p in places), what))
    return problems


def check_site(root: Path, site: DictConfig, labels: LabelSpace, splits: Sequence[str] = SPLITS) -> list[Problem]:
    """Every problem of a site's datalist and of each case it lists."""
    source = f"site '{site.name}'"
    entries, problems = check_datalist(root / site.datalist, splits, source)
    allowed = {0} | set(labels.foreground(site.classes, where=source))
    return problems + check_cases(source, datalist_cases(entries), allowed)


def check_federation(root: Path, cfg: DictConfig, labels: LabelSpace) -> list[Problem]:
    """Every problem of every site (and of the external test sites), in config order."""
    problems: list[Problem] = []
    for site in cfg.data.sites:
        problems += check_site(root, site, labels)
    for site in cfg.data.external:
        problems += check_site(root, site, labels, splits=("testing",))
    return problems
