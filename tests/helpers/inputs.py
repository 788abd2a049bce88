"""A one-site federation of tiny random volumes, and the checks of a refused command, for the input-gate tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fl.cli import main
from tests.helpers.layouts import AFFINE
from tests.helpers.runs import SMOKE

SITE = "[{name: liver, datalist: liver.json, classes: [liver, liver_tumor]}]"
SHAPE = (16, 16, 8)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    """Exit status and the non-empty stderr lines of `lightning-fl ARGS`, run in this process."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_refused(status: int, lines: list[str], command: str, named: Path | str) -> None:
    """Exit 2, one line `lightning-fl COMMAND: error: ...` that names `named`, no traceback."""
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"lightning-fl {command}: error: "), lines
    assert str(named) in lines[0], lines


def save_nifti(path: Path, voxels: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, affine), path)
    return path


def save_with_affine(path: Path, voxels: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI file whose sform is `affine` as given (nibabel cannot decompose a degenerate one into a qform)."""
    image = nib.Nifti1Image(voxels, None)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def random_case(folder: Path, name: str, seed: int) -> dict[str, str]:
    """A CT-like image (int16 HU) and a label of liver (1) and tumour (2) voxels, paths relative to `folder`."""
    rng = np.random.default_rng(seed)
    save_nifti(folder / "images" / f"{name}.nii.gz", rng.integers(-1000, 1000, SHAPE).astype(np.int16))
    save_nifti(folder / "labels" / f"{name}.nii.gz", rng.choice([0, 1, 2], SHAPE).astype(np.uint8))
    return {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}


def write_site(root: Path) -> dict:
    """A one-site federation under `root` (`liver.json`, one case per split); returns its datalist."""
    content = {
        split: [random_case(root, f"{split}_0", seed)]
        for seed, split in enumerate(("training", "validation", "testing"))
    }
    (root / "liver.json").write_text(json.dumps(content))
    return content


def site_args(root: Path) -> list[str]:
    return ["--config", SMOKE, "data.synthetic=null", f"data.root={root}", f"data.sites={SITE}", "data.external=[]"]


# --- the corpus: each entry turns a good file into one bad kind ---------------------------------
