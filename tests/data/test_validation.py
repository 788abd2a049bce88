"""`lightning-fl check-data`: every problem of every site, each naming the site, the case and what
is wrong, reported at once; `fit` refuses to start on such data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fl.config import load_config
from lightning_fl.data.validation import check_federation
from lightning_fl.labels import LabelSpace
from tests.helpers.cli import run_main


def _rewrite(path: Path, transform) -> None:
    """Replace a NIfTI file by a changed copy: transform(voxels, affine) -> (voxels, affine)."""
    image = nib.load(path)
    voxels, affine = transform(np.asanyarray(image.dataobj), image.affine.copy())
    nib.save(nib.Nifti1Image(voxels, affine), path)


@pytest.fixture()
def broken_federation(data_home, tmp_path) -> Path:
    """The smoke federation with one problem of each kind, spread over the sites."""
    root = tmp_path / "federation"
    shutil.copytree(data_home / "synthetic-smoke", root)
    lists = {
        site: json.loads((root / f"{site}.json").read_text())
        for site in ("liver", "spleen", "pancreas", "kidney", "unenhanced")
    }

    liver = lists["liver"]
    (root / liver["training"][0]["image"]).unlink()  # missing file
    (root / liver["training"][1]["label"]).write_bytes(b"not a NIfTI file")  # unreadable
    _rewrite(root / liver["validation"][0]["image"], lambda v, a: (v.astype(np.float32) * np.nan, a))  # NaN voxels
    liver["testing"][0].pop("label")  # an entry without its label

    spleen = lists["spleen"]
    _rewrite(
        root / spleen["training"][0]["label"], lambda v, a: (np.where(v > 0, 4, v).astype(np.uint8), a)
    )  # pancreas id
    _rewrite(root / spleen["training"][1]["label"], lambda v, a: (v[:-1], a))  # shape mismatch
    spleen["validation"] = []  # empty split
    _rewrite(root / spleen["testing"][0]["label"], lambda v, a: (v * np.float32(0.2), a))  # {0, 0.6}: fractional

    pancreas = lists["pancreas"]
    _rewrite(root / pancreas["training"][0]["label"], lambda v, a: (v, a @ np.diag([1.0, 1.0, 2.0, 1.0])))  # affine
    _rewrite(root / pancreas["training"][1]["image"], lambda v, a: (v[..., None], a))  # 4D image
    copy = root / "pancreas" / "copy_of_training_0.nii.gz"  # a training case copied into the test split
    shutil.copy(root / pancreas["training"][0]["image"], copy)
    pancreas["testing"][0]["image"] = str(copy.relative_to(root))
    flat = root / pancreas["validation"][0]["image"]  # zero voxel size along one axis, in the sform alone
    image = nib.load(flat)
    degenerate = nib.Nifti1Image(np.asanyarray(image.dataobj), None)
    degenerate.header.set_sform(image.affine @ np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(degenerate, flat)

    unenhanced = lists["unenhanced"]
    unenhanced["testing"].append(dict(unenhanced["testing"][0]))  # the same case twice in one split

    (root / "kidney.json").unlink()  # a whole datalist missing
    for site in ("liver", "spleen", "pancreas", "unenhanced"):
        (root / f"{site}.json").write_text(json.dumps(lists[site]))
    return root


EXPECTED = [
    ("site 'liver', training[0] liver_000.nii.gz", "file not found"),
    ("site 'liver', training[1] liver_001.nii.gz", "unreadable"),
    ("site 'liver', validation[0]", "NaN or infinite voxels"),
    ("site 'liver', ", "liver.json testing[0]: 'label' is missing"),
    ("site 'spleen', training[0]", "label values [4] are not among the classes [0, 3]"),
    ("site 'spleen', training[1]", "differs from label shape"),
    ("site 'spleen'", "expected a non-empty 'validation' list"),
    ("site 'spleen', testing[0]", "voxels of fractional values (e.g. [0.6]); expected whole class numbers"),
    ("site 'pancreas', training[0]", "affines differ"),
    ("site 'pancreas', training[1]", "image is not a 3D volume"),
    (
        "site 'pancreas', training[0] pancreas_000.nii.gz and testing[0] copy_of_training_0.nii.gz",
        "the same image is in several splits",
    ),
    ("site 'pancreas', validation[0]", "image has a degenerate affine (voxel sizes ["),
    ("site 'kidney'", "datalist not found"),
    (
        "site 'unenhanced', testing[0] unenhanced_000.nii.gz and testing[1] unenhanced_000.nii.gz",
        "the same image is listed more than once in one split",
    ),
]


def test_every_problem_is_found_and_named(broken_federation, smoke_config_path):
    cfg = load_config(smoke_config_path, ["data.synthetic=null", f"data.root={broken_federation}"])
    labels = LabelSpace.of(cfg.labels)
    problems = [str(p) for p in check_federation(broken_federation, cfg, labels)]
    for where, what in EXPECTED:
        assert any(p.startswith(where) and what in p for p in problems), f"not reported: {where}: {what}\n{problems}"
    assert len(problems) == len(EXPECTED), "\n".join(problems)  # nothing reported twice, nothing invented
    assert not any("external" in p for p in problems)


def test_clean_data_passes(data_home, smoke_config_path):
    cfg = load_config(smoke_config_path)
    labels = LabelSpace.of(cfg.labels)
    assert check_federation(data_home / "synthetic-smoke", cfg, labels) == []


def test_commands_list_all_problems_and_stop(cli, capsys, broken_federation, tmp_path):
    """check-data as a shell runs it (exit status 2, no traceback), fit in this process."""
    args = ["--config", "configs/smoke.yaml", "data.synthetic=null", f"data.root={broken_federation}"]
    result = cli("check-data", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{len(EXPECTED)} data problem(s) found" in result.stderr
    status, _, err = run_main(capsys, "fit", *args, f"output_dir={tmp_path / 'run'}")
    assert status == 2 and f"{len(EXPECTED)} data problem(s) found" in err
    assert not (tmp_path / "run").exists()  # fit stopped before creating the run folder
