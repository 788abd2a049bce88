"""Tiny datasets in the true published layouts (MSD, KiTS19, AMOS22): random HU and label values
on an LPS-like anisotropic grid, with the image and label types each dataset ships."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like, anisotropic


def write_volume(path: Path, values: np.ndarray, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values.astype(dtype), AFFINE), path)


def _case(rng, native_values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(-1000, 1000, (16, 16, 8))
    label = rng.choice([0] + native_values, size=(16, 16, 8))
    return image, label


def make_msd(root: Path, name: str, n: int, native: list[int]) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        image, label = _case(rng, native)
        write_volume(root / "imagesTr" / f"{name}_{i}.nii.gz", image, np.int16)
        write_volume(root / "labelsTr" / f"{name}_{i}.nii.gz", label, np.uint8)
        entries.append({"image": f"./imagesTr/{name}_{i}.nii.gz", "label": f"./labelsTr/{name}_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": name, "training": entries, "test": []}))
    return root


def make_kits(root: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        image, label = _case(rng, [1, 2])
        write_volume(root / f"case_{i:05d}" / "imaging.nii.gz", image, np.float32)
        write_volume(root / f"case_{i:05d}" / "segmentation.nii.gz", label, np.int32)
    (root / "case_00300").mkdir()  # a test case without segmentation: skipped
    write_volume(root / "case_00300" / "imaging.nii.gz", rng.integers(-1000, 1000, (16, 16, 8)), np.int16)
    return root


def make_amos(root: Path) -> Path:
    rng = np.random.default_rng(2)
    lists: dict[str, list] = {"training": [], "validation": []}
    for split, folder, ids in (("training", "Tr", [1, 2, 600]), ("validation", "Va", [3])):  # 600: an MRI case
        for i in ids:
            image, label = _case(rng, [1, 2, 3, 4, 6, 10, 15])
            write_volume(root / f"images{folder}" / f"amos_{i:04d}.nii.gz", image, np.int16)
            write_volume(root / f"labels{folder}" / f"amos_{i:04d}.nii.gz", label, np.uint8)
            lists[split].append(
                {"image": f"./images{folder}/amos_{i:04d}.nii.gz", "label": f"./labels{folder}/amos_{i:04d}.nii.gz"}
            )
    (root / "dataset.json").write_text(json.dumps(lists))
    return root
