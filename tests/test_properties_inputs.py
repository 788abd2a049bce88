"""Property-based tests of the input gate (Hypothesis, derandomized): whatever a datalist or a NIfTI
file holds (structure, encoding and paths; dtype, shape, affine, header fields, NaN and fractional
values), `check-data`, `prepare-data` and `infer` either run, or exit 2 with a one-line message (for
check-data, the list of every problem) and no traceback; no temporary or partial file is left in
the output folder; and every input drawn unchanged (valid) runs: a gate that refused everything
would fail. Each test also runs one valid example explicitly."""

from __future__ import annotations

import gzip
import json
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lightning_fl.cli import main
from tests.helpers.inputs import site_args, write_site
from tests.helpers.layouts import make_msd

# capsys is read before every example (see run), so sharing it between examples is safe
EXAMPLES = settings(
    derandomize=True,
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPLITS = ("training", "validation", "testing")


def run(capsys: pytest.CaptureFixture, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main([str(a) for a in args])  # a bug raises here, with its traceback: the property fails
    return status, capsys.readouterr().err.splitlines()


def assert_ran_or_refused(status: int, lines: list[str], command: str) -> None:
    """0, or 2 with one line `lightning-fl COMMAND: error: ...` (check-data's list of every data
    problem may follow it, one `  - ` line each); never a traceback."""
    assert status in (0, 2) and not any("Traceback" in line for line in lines), lines
    event(f"exit status {status}")  # --hypothesis-show-statistics: how many examples ran, how many were refused
    if status == 2:
        listed = lines[0].endswith("data problem(s) found:") and all(line.startswith("  - ") for line in lines[1:])
        assert lines[0].startswith(f"lightning-fl {command}: error: ") and (len(lines) == 1 or listed), lines


def usable(path: Path, whole: bool = False) -> bool:
    """Voxels that are all finite (and, for a label, whole numbers): what a command may accept."""
    voxels = np.asanyarray(nib.load(path).dataobj)
    return bool(np.isfinite(voxels).all() and (not whole or (voxels == np.round(voxels)).all()))


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files a write left behind (atomic writes and prepare-data's staging folder)."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# --- datalists: structure, encoding, paths --------------------------------------------------------

GOOD_ENTRIES = [{"image": f"images/{s}_0.nii.gz", "label": f"labels/{s}_0.nii.gz"} for s in SPLITS]
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # lone surrogates cannot be printed
paths = st.one_of(
    st.sampled_from([e[k] for e in GOOD_ENTRIES for k in ("image", "label")]),
    texts,
    st.sampled_from(
        ["", "../outside.nii.gz", "/no/such/file.nii.gz", "a\x00b.nii.gz", "x" * 300, "images", "liver.json"]
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
entries = st.one_of(
    st.fixed_dictionaries({"image": paths, "label": paths}),
    st.fixed_dictionaries({"image": paths | json_values, "label": paths | json_values}),
    json_values,
)


@st.composite
def datalists(draw) -> tuple[object, bool]:
    """The site's good datalist with at most one thing changed: a split, its entries, a path, the
    top level, or keys no command reads; and whether it is unchanged (valid)."""
    content: object = {split: [dict(entry)] for split, entry in zip(SPLITS, GOOD_ENTRIES)}
    split = draw(st.sampled_from(SPLITS))
    change = draw(st.sampled_from(["none", "split", "entries", "path", "top level", "other keys"]))
    if change == "split":
        content[split] = draw(json_values)
    elif change == "entries":
        content[split] = draw(st.lists(entries | st.sampled_from(GOOD_ENTRIES), max_size=3))
    elif change == "path":
        content[split][0][draw(st.sampled_from(["image", "label"]))] = draw(paths)
    elif change == "top level":
        content = draw(json_values)
    elif change == "other keys":
        content = draw(st.dictionaries(texts, json_values, max_size=3)) | content
    return content, change == "none"


@st.composite
def encoded(draw, drawn: st.SearchStrategy) -> tuple[bytes, bool]:
    """A JSON text in one of the encodings datalists are saved in, or damaged; and whether it is a
    valid datalist (an unchanged one, in UTF-8 with or without its BOM, or in an ASCII-only latin-1)."""
    content, valid = draw(drawn)
    text = json.dumps(content, ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "stray byte", "cut short"]))
    valid = valid and how in ("utf-8", "utf-8-sig", "latin-1")
    if how == "stray byte":
        data = text.encode()
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\xff" + data[at:], False
    if how == "cut short":
        return text.encode()[: draw(st.integers(0, len(text) - 1))], False
    return text.encode(how, errors="replace"), valid


VALID_DATALIST = (json.dumps({split: [entry] for split, entry in zip(SPLITS, GOOD_ENTRIES)}).encode(), True)


@EXAMPLES
@given(datalist=encoded(datalists()))
@example(datalist=VALID_DATALIST)
def test_check_data_on_any_datalist_runs_or_says_what_is_wrong(capsys, data_home, datalist):
    data, valid = datalist
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_site(root)
        (root / "liver.json").write_bytes(data)
        status, lines = run(capsys, "check-data", *site_args(root))
        assert_ran_or_refused(status, lines, "check-data")
        assert status == 0 or not valid, lines


# --- NIfTI files: dtype, shape, affine, header fields, voxel values -----------------------------

GOOD_DTYPES = {"image": [np.int16, np.float32, np.int32], "label": [np.uint8, np.int16, np.float32]}
ANY_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.complex64]
CLASSES = [0, 1, 2]  # the liver site's (and task's) classes
ODD_LABELS = [[0, 0.6], [0, 2.5, 1], [0, 9], [0, -1], [0, np.nan]]
# header fields (byte offset, struct format) of NIfTI-1, and values a damaged or odd header holds
FIELDS = {
    "dim[0]": (40, "<h"),
    "dim[1]": (42, "<h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim[1]": (80, "<f"),
    "pixdim[3]": (88, "<f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "srow_x[0]": (280, "<f"),
    "srow_y[1]": (300, "<f"),
    "srow_z[3]": (324, "<f"),
}
ODD_VALUES = [0, 1, -1, 2, 3, 7, 255, 4096, 0.5, float("nan"), float("inf"), 1e30]
CHANGES = ["none", "none", "dtype", "shape", "spacing", "axes", "values", "header", "bytes"]


@st.composite
def grids(draw) -> tuple[tuple[int, ...], np.ndarray, str]:
    """A shape and an affine (a few mm, maybe oblique), each perhaps odd, and the change drawn for the files."""
    change = draw(st.sampled_from(CHANGES))
    shape = draw(st.tuples(*[st.integers(4, 18)] * 3))
    if change == "shape":
        shape = draw(
            st.tuples(*[st.integers(1, 18)] * 3)
            | st.tuples(*[st.integers(2, 8)] * 4)
            | st.tuples(*[st.integers(2, 16)] * 2)
        )
    spacing = list(draw(st.tuples(*[st.floats(0.3, 10.0)] * 3)))
    if change == "spacing":
        spacing[draw(st.integers(0, 2))] = draw(st.sampled_from([0.0, -2.0, 1e5, float("nan"), float("inf")]))
    axes = (
        np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
        if change == "axes"
        else draw(st.sampled_from([np.eye(3), np.array([[1, 0.3, 0], [0, 1, 0.2], [0.1, 0, 1]])]))
    )
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(spacing)
    affine[:3, 3] = draw(st.floats(-500, 500))
    return shape, affine, change


TWO_MM = np.diag([2.0, 2.0, 2.0, 1.0])


def nifti(voxels: np.ndarray, affine: np.ndarray = TWO_MM) -> bytearray:
    """An uncompressed NIfTI-1 file whose sform is `affine`, as given (even a degenerate one)."""
    image = nib.Nifti1Image(voxels, None)
    image.header.set_sform(affine, code=1)
    return bytearray(image.to_bytes())


def nifti_bytes(draw, voxels: np.ndarray, affine: np.ndarray, change: str) -> tuple[bytes, str]:
    """The file (bytes, suffix), with the header or byte damage `change` asks for."""
    data = nifti(voxels, affine)
    if change == "header":
        for name, value in draw(
            st.lists(st.tuples(st.sampled_from(sorted(FIELDS)), st.sampled_from(ODD_VALUES)), min_size=1, max_size=2)
        ):
            offset, fmt = FIELDS[name]
            if fmt == "<f" or (float(value).is_integer() and abs(value) < 2**15):
                struct.pack_into(fmt, data, offset, value if fmt == "<f" else int(value))
    data = gzip.compress(bytes(data), compresslevel=1) if draw(st.booleans()) else bytes(data)
    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    if change == "bytes":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] if draw(st.booleans()) else data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    return data, suffix


def voxels_of(draw, shape: tuple[int, ...], role: str, change: str) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if role == "label":
        values = rng.choice(draw(st.sampled_from(ODD_LABELS)) if change == "values" else CLASSES, shape)
    else:
        values = rng.normal(0, 300, shape)
        if change == "values":
            values.flat[rng.integers(0, values.size, 2)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    dtype = draw(st.sampled_from(ANY_DTYPES if change == "dtype" else GOOD_DTYPES[role]))
    with np.errstate(invalid="ignore"):
        return values.astype(dtype)


@st.composite
def images(draw) -> tuple[bytes, str, bool]:
    """A NIfTI image, and whether it was drawn unchanged (valid)."""
    shape, affine, change = draw(grids())
    return *nifti_bytes(draw, voxels_of(draw, shape, "image", change), affine, change), change == "none"


@st.composite
def cases(draw) -> tuple[dict[str, tuple[bytes, str]], bool]:
    """An image and its label on one grid, the change drawn in one of the two files; and whether
    they were drawn unchanged (valid)."""
    shape, affine, change = draw(grids())
    damaged = draw(st.sampled_from(["image", "label"]))
    files = {
        role: nifti_bytes(
            draw,
            voxels_of(draw, shape, role, change if role == damaged else "none"),
            affine,
            change if role == damaged or change in ("shape", "spacing", "axes") else "none",
        )
        for role in ("image", "label")
    }
    return files, change == "none"


NAN_IMAGE = (
    bytes(nifti(np.where(np.eye(16)[:, :, None] > 0, np.nan, 40.0) * np.ones((1, 1, 16), np.float32))),
    ".nii",
    False,
)
VALID_IMAGE = (bytes(nifti(np.arange(4096, dtype=np.int16).reshape(16, 16, 16))), ".nii", True)
FRACTIONAL_CASE = (
    {
        "image": (bytes(nifti(np.arange(4096, dtype=np.int16).reshape(16, 16, 16))), ".nii"),
        "label": (bytes(nifti(np.where(np.arange(4096).reshape(16, 16, 16) % 2, 0.6, 0.0).astype(np.float32))), ".nii"),
    },
    False,
)
VALID_CASE = (
    {
        "image": VALID_IMAGE[:2],
        "label": (bytes(nifti((np.arange(4096).reshape(16, 16, 16) % 3).astype(np.uint8))), ".nii"),
    },
    True,
)


@EXAMPLES
@given(image=images())
@example(image=NAN_IMAGE)  # always tried, whatever is drawn: the findings of issue 11
@example(image=VALID_IMAGE)
def test_infer_on_any_image_writes_its_map_or_says_why_not(capsys, smoke_run, image):
    data, suffix, valid = image
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / f"case{suffix}", Path(folder) / "out"
        source.write_bytes(data)
        status, lines = run(
            capsys, "infer", "--checkpoint", smoke_run / "best.ckpt", "--input", source, "--output", out
        )
        assert_ran_or_refused(status, lines, "infer")
        assert status == 0 or not valid, lines
        written = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert written == (["case.nii.gz"] if status == 0 else []), lines
        if status == 0:  # never a map of NaN voxels (all background, with exit status 0)
            assert usable(source) and nib.load(out / "case.nii.gz").shape == nib.load(source).shape


@EXAMPLES
@given(case=cases())
@example(case=FRACTIONAL_CASE)
@example(case=VALID_CASE)
def test_check_data_on_any_case_runs_or_lists_its_problems(capsys, data_home, case):
    files, valid = case
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        content = write_site(root)
        for role, (data, suffix) in files.items():
            (root / f"testing_0_{role}{suffix}").write_bytes(data)
            content["testing"][0][role] = f"testing_0_{role}{suffix}"
        (root / "liver.json").write_text(json.dumps(content))
        status, lines = run(capsys, "check-data", *site_args(root))
        assert_ran_or_refused(status, lines, "check-data")
        assert status == 0 or not valid, lines
        if status == 0:
            assert usable(root / content["testing"][0]["image"]) and usable(
                root / content["testing"][0]["label"], whole=True
            )


@EXAMPLES
@given(case=cases())
@example(case=FRACTIONAL_CASE)
@example(case=VALID_CASE)
def test_prepare_data_on_any_case_writes_a_site_or_nothing(capsys, case):
    files, valid = case
    with tempfile.TemporaryDirectory() as folder:
        src, dst = make_msd(Path(folder) / "Task03_Liver", "liver", 3, [1, 2]), Path(folder) / "out" / "data"
        manifest = json.loads((src / "dataset.json").read_text())
        for role, (data, suffix) in files.items():
            (src / manifest["training"][1][role]).unlink()
            manifest["training"][1][role] = f"{role}sTr/liver_1{suffix}"  # one case name, whatever its files' suffixes
            (src / manifest["training"][1][role]).write_bytes(data)
        (src / "dataset.json").write_text(json.dumps(manifest))
        status, lines = run(capsys, "prepare-data", "--task", "liver", "--src", src, "--dst", dst)
        assert_ran_or_refused(status, lines, "prepare-data")
        assert status == 0 or not valid, lines
        assert leftovers(dst.parent) == [] and dst.exists() == (status == 0), lines
        if status == 0:  # the label as given, never rounded: {0, 0.6} is refused, not written as empty
            listing = json.loads((dst / "liver.json").read_text())
            assert sum(len(listing[s]) for s in SPLITS) == 3
            assert usable(src / manifest["training"][1]["image"]) and usable(
                src / manifest["training"][1]["label"], whole=True
            )
