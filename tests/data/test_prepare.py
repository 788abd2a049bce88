"""`prepare-data`: tiny fabricated datasets in the true MSD, KiTS19 and AMOS22 layouts, and the real
spleen_8 volume in an MSD Task09 layout, become sites the training reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fl.config import ConfigError, load_config
from lightning_fl.data.datasets import read_datalist
from lightning_fl.data.prepare import prepare_task
from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelSpace
from tests.helpers.cli import refused
from tests.helpers.layouts import AFFINE, make_amos, make_kits, make_msd, write_volume
from tests.helpers.runs import REPO


@pytest.fixture(scope="module")
def labels():
    cfg = load_config()
    return LabelSpace.of(cfg.labels)


def test_msd_task_is_split_remapped_and_readable(tmp_path, labels):
    src = make_msd(tmp_path / "Task07_Pancreas", "pancreas", 10, [1, 2])
    listing = prepare_task("pancreas", src, tmp_path / "data", labels, seed=3)
    splits = read_datalist(listing)
    assert [len(splits[k]) for k in ("training", "validation", "testing")] == [6, 2, 2]
    names = [Path(item["image"]).name for items in splits.values() for item in items]
    assert sorted(names) == sorted(f"pancreas_{i}.nii.gz" for i in range(10))  # each case once
    for item in splits["training"]:
        label = nib.load(item["label"])
        source = nib.load(src / "labelsTr" / Path(item["label"]).name)
        expected = np.select([np.asarray(source.dataobj) == 1, np.asarray(source.dataobj) == 2], [4, 5], 0)
        assert np.array_equal(np.asarray(label.dataobj), expected) and np.allclose(label.affine, AFFINE)
        assert label.get_data_dtype() == np.uint8
    again = prepare_task("pancreas", src, tmp_path / "again", labels, seed=3)
    assert json.loads(again.read_text()) == json.loads(listing.read_text())  # seeded


def test_kits_and_amos_layouts(tmp_path, labels):
    kidney = read_datalist(prepare_task("kidney", make_kits(tmp_path / "kits19", 5), tmp_path / "data", labels))
    assert sum(len(v) for v in kidney.values()) == 5
    for item in (item for items in kidney.values() for item in items):  # every KiTS19 image is called imaging.nii.gz
        case = Path(item["label"]).name.removesuffix(".nii.gz")
        assert Path(item["image"]).name == f"{case}.nii.gz"
        assert np.array_equal(
            nib.load(item["image"]).get_fdata(), nib.load(tmp_path / "kits19" / case / "imaging.nii.gz").get_fdata()
        )
    values = set(np.unique(nib.load(kidney["training"][0]["label"]).get_fdata()).astype(int))
    assert values == {0, 6, 7}
    amos = prepare_task("amos", make_amos(tmp_path / "amos22"), tmp_path / "data", labels)
    content = json.loads(amos.read_text())
    assert [Path(e["image"]).name for e in content["testing"]] == [
        "amos_0001.nii.gz",
        "amos_0002.nii.gz",
        "amos_0003.nii.gz",
    ]
    assert set(content) == {"name", "testing"}  # an external site is test-only
    label = np.asarray(nib.load(tmp_path / "data" / content["testing"][0]["label"]).dataobj)
    assert set(np.unique(label)) == {0, 1, 3, 4, 6}  # liver, spleen, pancreas, kidney; others background


def test_existing_splits_are_reused(tmp_path, labels):
    src = make_msd(tmp_path / "Task09_Spleen", "spleen", 5, [1])
    given = tmp_path / "published.json"
    given.write_text(
        json.dumps(
            {
                "training": [{"image": "imagesTr/spleen_0.nii.gz"}, "spleen_1.nii.gz", "spleen_2"],
                "validation": ["spleen_3"],
                "testing": ["spleen_4"],
            }
        )
    )
    content = json.loads(prepare_task("spleen", src, tmp_path / "data", labels, datalist=given).read_text())
    assert [len(content[k]) for k in ("training", "validation", "testing")] == [3, 1, 1]
    assert Path(content["testing"][0]["image"]).name == "spleen_4.nii.gz"


@pytest.mark.parametrize(
    "damage,message",
    [
        ("label_value", r"liver_2.nii.gz has label values \[3\] that the label map 'liver' does not list"),
        ("grid", r"image shape \(16, 16, 8\) differs from label shape \(16, 16, 7\)"),
        ("missing", "label file not found: .*liver_2.nii.gz"),
        ("fractional", r"label has 1024 voxels of fractional values \(e.g. \[0.6\]\); expected whole class numbers"),
        ("duplicate", r"case 'liver_[02]' and case 'liver_[02]': the same image is"),
    ],
)
def test_bad_cases_name_the_file_and_leave_nothing_behind(tmp_path, labels, damage, message):
    """Every source case is checked before anything is written: a label of {0, 0.6} is refused,
    not rounded to an empty one, and an image copied under another name is found."""
    src = make_msd(tmp_path / "Task03_Liver", "liver", 4, [1, 2])
    label = src / "labelsTr" / "liver_2.nii.gz"
    if damage == "label_value":
        write_volume(label, np.full((16, 16, 8), 3), np.uint8)
    elif damage == "grid":
        write_volume(label, np.zeros((16, 16, 7)), np.uint8)
    elif damage == "fractional":
        write_volume(label, np.where(np.arange(16 * 16 * 8).reshape(16, 16, 8) % 2, 0.6, 0.0), np.float32)
    elif damage == "duplicate":
        shutil.copyfile(src / "imagesTr" / "liver_0.nii.gz", src / "imagesTr" / "liver_2.nii.gz")
    else:
        label.unlink()
    dst = tmp_path / "data"
    with pytest.raises(DatalistError, match=message) as err:
        prepare_task("liver", src, dst, labels)
    assert "liver_2" in str(err.value)
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["Task03_Liver"]


def test_command_line_errors(cli, capsys, tmp_path):
    """The first as a shell sees it (exit status 2, one line), the second in this process."""
    result = cli("prepare-data", "--task", "lung", "--src", str(tmp_path), "--dst", str(tmp_path / "d"))
    assert result.returncode == 2 and "unknown task 'lung'" in result.stderr and len(result.stderr.splitlines()) == 1
    error = refused(capsys, "prepare-data", "--task", "liver", "--src", tmp_path, "--dst", tmp_path / "d")
    assert "dataset.json not found" in error
    with pytest.raises(ConfigError):
        from lightning_fl.data.prepare import load_task

        load_task("lung")


@pytest.mark.realdata
def test_real_spleen_case_in_msd_layout(realdata, tmp_path, labels):
    """spleen_8 (LAS, 0.785 × 0.785 × 7.5 mm) through prepare-data and the paper's preprocessing."""
    src = tmp_path / "Task09_Spleen"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    shutil.copyfile(realdata / "spleen_8_ct.nii.gz", src / "imagesTr" / "spleen_8.nii.gz")
    shutil.copyfile(realdata / "spleen_8_label_orig.nii.gz", src / "labelsTr" / "spleen_8.nii.gz")
    (src / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./imagesTr/spleen_8.nii.gz", "label": "./labelsTr/spleen_8.nii.gz"}]})
    )
    given = tmp_path / "split.json"
    given.write_text(json.dumps({"training": ["spleen_8"], "validation": [], "testing": []}))
    listing = prepare_task("spleen", src, tmp_path / "data", labels, datalist=given)
    item = read_datalist(listing, required=("training",))["training"][0]
    label = nib.load(item["label"])
    assert nib.aff2axcodes(label.affine) == ("L", "A", "S")
    assert np.allclose(label.header.get_zooms(), (0.785, 0.785, 7.5), atol=1e-3)
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 3}

    from lightning_fl.data.transforms import evaluation_transform

    cfg = load_config(REPO / "configs" / "condistfl_paper.yaml")
    out = evaluation_transform(cfg.data)(item)
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert np.allclose(out["image"].pixdim.numpy(), cfg.data.spacing_mm, atol=1e-3)
    assert set(np.unique(out["label"].numpy())) == {0, 3}
