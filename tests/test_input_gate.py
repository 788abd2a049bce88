"""One input gate for every command: each subcommand meets a corpus of malformed files (datalists,
images and labels, model files) with exit status 2 and one line that names the file, and leaves
nothing half-written. The corpus is made here, from tiny 16 × 16 × 8 volumes."""

from __future__ import annotations

import datetime
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.inputs import (
    SHAPE,
    assert_refused,
    run_cli,
    save_nifti,
    save_with_affine,
    site_args,
    write_site,
)
from tests.helpers.layouts import AFFINE, make_msd
from tests.helpers.runs import SMOKE


def json_kinds(good: dict, split: str) -> dict[str, bytes]:
    """Malformed datalists, each with exactly one problem, in `split` where the kind is about an entry."""
    entry = good[split][0]

    def with_split(value) -> bytes:
        return json.dumps(good | {split: value}).encode()

    return {
        "not JSON": b'{"training": [',
        "empty file": b"",
        "UTF-16 text": json.dumps(good).encode("utf-16"),
        "Latin-1 text": json.dumps(good | {"name": "Universitätsklinik"}, ensure_ascii=False).encode("latin-1"),
        "nested too deeply": b"[" * 100_000,
        "top level a list": json.dumps(good[split]).encode(),
        "top level a string": b'"liver.json"',
        "split not a list": with_split(entry),
        "split empty": with_split([]),
        "entry a string": with_split([entry["image"]]),
        "label null": with_split([entry | {"label": None}]),
        "label a number": with_split([entry | {"label": 3}]),
        "label a list": with_split([entry | {"label": [entry["label"]]}]),
        "label empty": with_split([entry | {"label": ""}]),
        "image missing": with_split([{"label": entry["label"]}]),
    }


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _volume(voxels: np.ndarray, affine: np.ndarray = AFFINE) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_with_affine(path, voxels, affine)

    return write


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _with_nan(dtype: type, value: float) -> np.ndarray:
    voxels = np.random.default_rng(3).normal(0, 100, SHAPE).astype(dtype)
    voxels[3, 4, 5] = value
    return voxels


SINGULAR = AFFINE.copy()
SINGULAR[:3, 1] = SINGULAR[:3, 0]  # two axes along one direction: a flat grid
ZERO_SPACING = AFFINE @ np.diag([1.0, 0.0, 1.0, 1.0])
NAN_AFFINE = AFFINE.copy()
NAN_AFFINE[0, 3] = np.nan
FILE_KINDS: dict[str, Callable[[Path], None]] = {
    "random bytes": _bytes(np.random.default_rng(0).bytes(3000)),
    "empty file": _bytes(b""),
    "text file": _bytes(b"patient 0042: see the report\n" * 40),
    "truncated": _truncated,
}
IMAGE_KINDS: dict[str, Callable[[Path], None]] = FILE_KINDS | {
    "NaN voxels": _volume(_with_nan(np.float32, np.nan)),
    "infinite voxels": _volume(_with_nan(np.float64, -np.inf)),
    "4D": _volume(np.zeros(SHAPE + (2,), np.int16)),
    "zero voxel size": _volume(np.zeros(SHAPE, np.int16), ZERO_SPACING),
    "singular affine": _volume(np.zeros(SHAPE, np.int16), SINGULAR),
    "NaN in the affine": _volume(np.zeros(SHAPE, np.int16), NAN_AFFINE),
    "complex voxels": _volume(np.zeros(SHAPE, np.complex64)),
}
LABEL_KINDS: dict[str, Callable[[Path], None]] = FILE_KINDS | {
    "fractional label": _volume(np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3, 0.0, 0.6).astype(np.float32)),
    "NaN label": _volume(_with_nan(np.float32, np.nan).round()),
    "4D label": _volume(np.zeros(SHAPE + (1,), np.uint8)),
}
NIFTI_CASES = [("image", kind) for kind in IMAGE_KINDS] + [("label", kind) for kind in LABEL_KINDS]


def damage(path: Path, kind: str, which: str) -> None:
    (IMAGE_KINDS if which == "image" else LABEL_KINDS)[kind](path)


def checkpoint_kinds(good: Path) -> dict[str, Callable[[Path], None]]:
    """Writers of files that are not this project's model files; `good` (a best.ckpt) gives those that nearly are."""
    payload = torch.load(good, map_location="cpu", weights_only=True)

    def saved(obj) -> Callable[[Path], None]:
        return lambda path: torch.save(obj, path)

    def not_a_checkpoint_zip(path: Path) -> None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a model")

    return FILE_KINDS | {
        "a plain tensor": saved(torch.zeros(3)),
        "a list": saved([1, 2, 3]),
        "a dict without model": saved({k: v for k, v in payload.items() if k != "model"}),
        "weights that are not tensors": saved(payload | {"model": {"w": 1.0}}),
        "config not a mapping": saved(payload | {"config": "smoke.yaml"}),
        "classes not names": saved(payload | {"classes": 8}),
        "a pickle weights_only refuses": saved({"model": {}, "made": datetime.date(2024, 1, 1)}),
        "a zip that is not a checkpoint": not_a_checkpoint_zip,
    }


def torchscript_kinds() -> dict[str, Callable[[Path], None]]:
    scripted = torch.jit.script(torch.nn.Conv3d(1, 8, 1))

    def with_metadata(text: str) -> Callable[[Path], None]:
        return lambda path: torch.jit.save(scripted, str(path), _extra_files={"metadata.json": text})

    return {
        "random bytes": FILE_KINDS["random bytes"],
        "metadata not JSON": with_metadata("{oops"),
        "metadata a list": with_metadata("[]"),
        "config not a mapping": with_metadata('{"lightning_fl": {"config": 3}}'),
    }


# --- the fixtures ---------------------------------------------------------------------------------


@pytest.fixture()
def site(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "federation"
    return root, write_site(root)


def msd_source(tmp_path: Path) -> Path:
    return make_msd(tmp_path / "Task03_Liver", "liver", 3, [1, 2])


def model_args(command: str, root: Path, good: dict, out: Path) -> list:
    """What evaluate, infer and export need beside --checkpoint: good inputs, an output folder."""
    return {
        "evaluate": ["--datalist", root / "liver.json", "--output", out],
        "infer": ["--input", root / good["testing"][0]["image"], "--output", out],
        "export": ["--output", out],
    }[command]


# --- datalists ----------------------------------------------------------------------------------

# Every kind goes through check-data (datalists, images, labels), infer (images) and export (model
# files); the other commands share those checks (validation.py, inference.load_trained) and meet a
# few kinds of each family, so that the whole table runs in about half a minute.
JSON_KINDS = list(json_kinds({"testing": [{"image": "i", "label": "l"}]}, "testing"))
FEW_JSON = ["not JSON", "Latin-1 text", "top level a list", "split empty", "label null"]
FEW_NIFTI = [
    ("image", "random bytes"),
    ("image", "NaN voxels"),
    ("image", "zero voxel size"),
    ("label", "fractional label"),
    ("label", "empty file"),
    ("image", "4D"),
]


@pytest.mark.parametrize("command,kind", [("check-data", k) for k in JSON_KINDS] + [("fit", "label null")])
def test_check_data_and_fit_refuse_a_malformed_site_datalist(capsys, data_home, site, tmp_path, command, kind):
    root, good = site
    datalist = root / "liver.json"
    datalist.write_bytes(json_kinds(good, "testing")[kind])
    extra = [f"output_dir={tmp_path / 'run'}"] if command == "fit" else []
    assert_refused(*run_cli(capsys, command, *site_args(root), *extra), command, datalist)


@pytest.mark.parametrize("kind", FEW_JSON)
def test_evaluate_refuses_a_malformed_datalist(capsys, smoke_run, site, tmp_path, kind):
    root, good = site
    datalist = root / "liver.json"
    datalist.write_bytes(json_kinds(good, "testing")[kind])
    out = tmp_path / "evaluation"
    assert_refused(
        *run_cli(capsys, "evaluate", "--checkpoint", smoke_run / "best.ckpt", "--datalist", datalist, "--output", out),
        "evaluate",
        datalist,
    )
    assert not out.exists()


@pytest.mark.parametrize("kind", FEW_JSON)
def test_prepare_data_refuses_a_malformed_dataset_json(capsys, tmp_path, kind):
    src = msd_source(tmp_path)
    manifest = src / "dataset.json"
    manifest.write_bytes(json_kinds(json.loads(manifest.read_text()), "training")[kind])
    dst = tmp_path / "data"
    assert_refused(
        *run_cli(capsys, "prepare-data", "--task", "liver", "--src", src, "--dst", dst), "prepare-data", manifest
    )
    assert not dst.exists()


@pytest.mark.parametrize(
    "kind",
    [
        "not JSON",
        "empty file",
        "UTF-16 text",
        "Latin-1 text",
        "nested too deeply",
        "top level a list",
        "top level a string",
        "split not a list",
        "image missing",
    ],
)
def test_prepare_data_refuses_a_malformed_splits_file(capsys, tmp_path, kind):
    """`--datalist` gives the splits: entries with an "image" (a "label" is not read), or case names."""
    src = msd_source(tmp_path)
    splits = tmp_path / "splits.json"
    good = {"training": [{"image": "liver_0.nii.gz", "label": "x"}], "validation": ["liver_1"], "testing": ["liver_2"]}
    splits.write_bytes(json_kinds(good, "training")[kind])
    dst = tmp_path / "data"
    assert_refused(
        *run_cli(capsys, "prepare-data", "--task", "liver", "--src", src, "--dst", dst, "--datalist", splits),
        "prepare-data",
        splits,
    )
    assert not dst.exists()


# --- images and labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,which,kind", [("check-data", *c) for c in NIFTI_CASES] + [("fit", "label", "fractional label")]
)
def test_check_data_and_fit_refuse_a_bad_image_or_label(capsys, data_home, site, tmp_path, command, which, kind):
    root, good = site
    bad = root / good["testing"][0][which]
    damage(bad, kind, which)
    extra = [f"output_dir={tmp_path / 'run'}"] if command == "fit" else []
    assert_refused(*run_cli(capsys, command, *site_args(root), *extra), command, bad)


@pytest.mark.parametrize("which,kind", FEW_NIFTI)
def test_evaluate_refuses_a_bad_case_before_scoring(capsys, smoke_run, site, tmp_path, which, kind):
    root, good = site
    bad = root / good["testing"][0][which]
    damage(bad, kind, which)
    out = tmp_path / "evaluation"
    assert_refused(
        *run_cli(
            capsys,
            "evaluate",
            "--checkpoint",
            smoke_run / "best.ckpt",
            "--datalist",
            root / "liver.json",
            "--output",
            out,
        ),
        "evaluate",
        bad,
    )
    assert not out.exists()


@pytest.mark.parametrize("which,kind", FEW_NIFTI)
def test_prepare_data_refuses_a_bad_source_case_before_writing(capsys, tmp_path, which, kind):
    src = msd_source(tmp_path)
    bad = src / ("imagesTr" if which == "image" else "labelsTr") / "liver_1.nii.gz"
    damage(bad, kind, which)
    dst = tmp_path / "data"
    assert_refused(*run_cli(capsys, "prepare-data", "--task", "liver", "--src", src, "--dst", dst), "prepare-data", bad)
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["Task03_Liver"]


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_infer_refuses_a_bad_image(capsys, smoke_run, tmp_path, kind):
    image = tmp_path / "inputs" / "case.nii.gz"
    save_nifti(image, np.zeros(SHAPE, np.int16))
    damage(image, kind, "image")
    out = tmp_path / "out"
    assert_refused(
        *run_cli(capsys, "infer", "--checkpoint", smoke_run / "best.ckpt", "--input", image, "--output", out),
        "infer",
        image,
    )
    assert not out.exists() or not any(out.iterdir())


# --- model files --------------------------------------------------------------------------------

CHECKPOINT_KINDS = list(FILE_KINDS) + [
    "a plain tensor",
    "a list",
    "a dict without model",
    "weights that are not tensors",
    "config not a mapping",
    "classes not names",
    "a pickle weights_only refuses",
    "a zip that is not a checkpoint",
]
FEW_CHECKPOINTS = ["random bytes", "a plain tensor", "a dict without model", "a pickle weights_only refuses"]
TORCHSCRIPT_KINDS = ["random bytes", "metadata not JSON", "metadata a list", "config not a mapping"]


@pytest.mark.parametrize(
    "command,kind",
    [("export", k) for k in CHECKPOINT_KINDS] + [(c, k) for c in ("evaluate", "infer") for k in FEW_CHECKPOINTS],
)
def test_model_commands_refuse_a_file_that_is_not_a_checkpoint(capsys, smoke_run, site, tmp_path, command, kind):
    root, good = site
    ckpt = tmp_path / "model" / "best.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(smoke_run / "best.ckpt", ckpt)
    checkpoint_kinds(smoke_run / "best.ckpt")[kind](ckpt)
    out = tmp_path / "out"
    assert_refused(
        *run_cli(capsys, command, "--checkpoint", ckpt, *model_args(command, root, good, out)), command, ckpt
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "command,kind",
    [("infer", k) for k in TORCHSCRIPT_KINDS] + [(c, "metadata not JSON") for c in ("evaluate", "export")],
)
def test_model_commands_refuse_a_torchscript_file_not_made_by_export(capsys, site, tmp_path, command, kind):
    root, good = site
    model = tmp_path / "model.ts"
    torchscript_kinds()[kind](model)
    out = tmp_path / "out"
    assert_refused(
        *run_cli(capsys, command, "--checkpoint", model, *model_args(command, root, good, out)), command, model
    )
    assert not out.exists()


@pytest.mark.parametrize("kind", FEW_CHECKPOINTS)
def test_fit_resume_refuses_a_state_file_that_is_not_a_checkpoint(capsys, smoke_run, tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy(smoke_run / name, run / name)
    state = run / "state.ckpt"
    shutil.copy(smoke_run / "state.ckpt", state)
    checkpoint_kinds(smoke_run / "best.ckpt")[kind](state)
    before = sorted(p.name for p in run.iterdir())
    assert_refused(*run_cli(capsys, "fit", "--resume", run), "fit", state)
    assert sorted(p.name for p in run.iterdir() if p.name != "run.lock") == before


def test_check_data_refuses_a_synthetic_root_that_does_not_exist_instead_of_filling_it(capsys, tmp_path):
    typo = tmp_path / "synthtic"
    status, lines = run_cli(capsys, "check-data", "--config", SMOKE, f"data.root={typo}")
    assert_refused(status, lines, "check-data", f"data.root {typo} does not exist")
    assert list(tmp_path.iterdir()) == []
