"""Datalists, the synthetic-data cache and the MONAI pipelines, on real NIfTI files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from lightning_fl.config import load_config
from lightning_fl.data.datasets import DatalistError, prepare_data_root, read_datalist
from lightning_fl.data.transforms import evaluation_transform, training_transform
from lightning_fl.labels import LabelSpace
from tests.helpers.runs import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("cache") / "federation"
    cfg = load_config(SMOKE, [f"data.root={root}"])
    labels = LabelSpace.of(cfg.labels)
    assert prepare_data_root(cfg, labels) == root
    return root, cfg


def test_synthetic_federation_is_generated_once_and_reused(smoke_root):
    root, cfg = smoke_root
    labels = LabelSpace.of(cfg.labels)
    stamp = (root / "liver.json").stat().st_mtime_ns
    assert prepare_data_root(cfg, labels) == root
    assert (root / "liver.json").stat().st_mtime_ns == stamp


GENERATE = (
    "import sys\n"
    "from lightning_fl.config import load_config\n"
    "from lightning_fl.data.datasets import prepare_data_root\n"
    "from lightning_fl.labels import LabelSpace\n"
    "cfg = load_config(sys.argv[1], ['data.root=' + sys.argv[2]])\n"
    "prepare_data_root(cfg, LabelSpace.of(cfg.labels))\n"
)


def test_two_commands_started_at_once_on_a_fresh_machine_share_one_generation(tmp_path, smoke_root):
    """One generates the federation under the lock beside it, the other waits and uses it (as a
    sweep's first wave of parallel runs does); both give the same files as a single generation."""
    root = tmp_path / "federation"
    commands = [
        subprocess.Popen([sys.executable, "-c", GENERATE, str(SMOKE), str(root)], cwd=REPO, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for command in commands:
        _, err = command.communicate(timeout=600)
        assert command.returncode == 0, err.decode()[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".federation.lock", "federation"]
    alone, _ = smoke_root
    assert (root / "synthetic.yaml").read_bytes() == (alone / "synthetic.yaml").read_bytes()
    assert (root / "liver.json").read_bytes() == (alone / "liver.json").read_bytes()


def test_cached_federation_from_other_settings_is_refused(smoke_root):
    root, _ = smoke_root
    cfg = load_config(SMOKE, [f"data.root={root}", "data.synthetic.seed=7"])
    labels = LabelSpace.of(cfg.labels)
    with pytest.raises(DatalistError, match="not generated from this config's synthetic settings"):
        prepare_data_root(cfg, labels)


def test_datalist_errors_name_the_file_and_entry(smoke_root, tmp_path):
    root, _ = smoke_root
    with pytest.raises(DatalistError, match="datalist not found: .*nope.json"):
        read_datalist(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatalistError, match="broken.json: not valid JSON"):
        read_datalist(broken)
    content = json.loads((root / "spleen.json").read_text())
    site = tmp_path / "site.json"
    site.write_text(json.dumps(content | {"validation": []}))
    with pytest.raises(DatalistError, match="site.json: expected a non-empty 'validation' list"):
        read_datalist(site)
    shutil.copytree(root / "spleen", tmp_path / "spleen")
    (tmp_path / content["testing"][0]["label"]).unlink()
    site.write_text(json.dumps(content))
    with pytest.raises(DatalistError, match=r"site.json: testing\[0\] label file not found: .*spleen_00\d.nii.gz"):
        read_datalist(site)


def test_training_pipeline_gives_patches_of_the_configured_size(smoke_root):
    root, cfg = smoke_root
    item = read_datalist(root / "pancreas.json")["training"][0]
    transform = training_transform(cfg.data, [0, 4, 5], cfg.labels.classes)
    transform.set_random_state(0)
    patches = transform(item)
    assert len(patches) == cfg.data.samples_per_volume
    for patch in patches:
        assert tuple(patch["image"].shape) == (1, *cfg.data.patch_size)
        assert set(np.unique(patch["label"].numpy())) <= {0, 4, 5}


@pytest.mark.parametrize("crop", ["pos_neg", "classes"])
def test_class_balanced_crops_centre_small_classes_as_often_as_large_ones(smoke_root, crop):
    """With `data.crop: classes` a tumour is a patch centre as often as its organ and the
    background, whatever its size; with the paper's pos_neg crops 2 in 3 centres are foreground,
    shared between organ and tumour in proportion to their voxels."""
    root, cfg = smoke_root
    cfg = cfg.copy()
    cfg.data.crop, cfg.data.samples_per_volume, cfg.data.patch_size = crop, 300, [8, 8, 8]  # centre = patch[4, 4, 4]
    cfg.data.spacing_mm = [4.0, 4.0, 4.0]
    item = next(
        i
        for i in read_datalist(root / "kidney.json")["training"]
        if (np.asanyarray(nib.load(i["label"]).dataobj) == 7).any()
    )
    label = evaluation_transform(cfg.data)(item)["label"].numpy()
    tumour_share = float((label == 7).sum() / np.isin(label, [6, 7]).sum())
    transform = training_transform(cfg.data, [0, 6, 7], cfg.labels.classes)
    transform.set_random_state(1)
    centres = np.array([int(p["label"][0, 4, 4, 4]) for p in transform(item)])
    share = {c: float(np.mean(centres == c)) for c in (0, 6, 7)}
    expected = (
        {0: 1 / 3, 6: 1 / 3, 7: 1 / 3}
        if crop == "classes"
        else {0: 1 / 3, 6: 2 / 3 * (1 - tumour_share), 7: 2 / 3 * tumour_share}
    )
    assert all(abs(share[c] - expected[c]) < 0.1 for c in share), (share, expected)


def test_2d_slices_are_centred_on_each_class_at_its_configured_share(smoke_root):
    """A 2D patch is one axial slice, resampled in plane only (the volume keeps its slice spacing),
    and its centre pixel lies in each class at that class's `data.class_ratios` share, counted over
    many draws: kidney twice as often as background and tumour."""
    root, _ = smoke_root
    cfg = load_config(
        REPO / "configs" / "smoke_2d.yaml",
        [f"data.root={root}", "data.crop=classes", "data.class_ratios={kidney: 2.0}", "data.spacing_mm=[4, 4, 0]"],
    )
    cfg.data.samples_per_volume, cfg.data.patch_size = 400, [8, 8]  # centre = slice[4, 4]
    item = next(
        i
        for i in read_datalist(root / "kidney.json")["training"]
        if (np.asanyarray(nib.load(i["label"]).dataobj) == 7).any()
    )
    native_z = float(nib.load(item["image"]).header.get_zooms()[2])
    transform = training_transform(cfg.data, [0, 6, 7], cfg.labels.classes)
    transform.set_random_state(2)
    slices = transform(item)
    assert all(tuple(s["image"].shape) == (1, 8, 8) for s in slices)
    centres = np.array([int(s["label"][0, 4, 4]) for s in slices])
    share = {c: float(np.mean(centres == c)) for c in (0, 6, 7)}
    assert all(abs(share[c] - expected) < 0.07 for c, expected in ((0, 0.25), (6, 0.5), (7, 0.25))), share
    volume = evaluation_transform(cfg.data)(item)["image"]
    assert np.allclose(np.abs(np.diag(volume.affine.numpy())[:3]), [4.0, 4.0, native_z])


def test_preprocessing_reorients_resamples_and_windows(smoke_root):
    root, cfg = smoke_root
    item = read_datalist(root / "kidney.json")["validation"][0]
    out = evaluation_transform(cfg.data)(item)
    image = out["image"]
    assert isinstance(image, MetaTensor)
    assert np.allclose(np.abs(np.diag(image.affine.numpy())[:3]), cfg.data.spacing_mm)
    window = cfg.data.intensity
    lo, hi = (window.hu_min - window.center) / window.scale, (window.hu_max - window.center) / window.scale
    assert image.min() >= lo - 1e-5 and image.max() <= hi + 1e-5
    assert out["label"].shape == image.shape


@pytest.mark.realdata
def test_real_ct_goes_through_the_demo_preprocessing(realdata):
    """spleen_8 of MSD Task09 is LAS, 0.785 × 0.785 × 7.5 mm, int16 HU: it must come out RAS, on
    the configured grid, windowed, with its label aligned."""
    cfg = load_config(SMOKE)
    item = {"image": str(realdata / "spleen_8_ct.nii.gz"), "label": str(realdata / "spleen_8_label_orig.nii.gz")}
    out = evaluation_transform(cfg.data)(item)
    image, label = out["image"], out["label"]
    affine = image.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0)  # RAS: every axis increases towards R, A, S
    assert np.allclose(np.diag(affine)[:3], cfg.data.spacing_mm)
    extent_mm = np.array([512 * 0.785, 512 * 0.785, 32 * 7.5])
    assert np.allclose(np.array(image.shape[1:]) * cfg.data.spacing_mm, extent_mm, atol=2 * max(cfg.data.spacing_mm))
    spleen = label[0] > 0
    assert 0 < spleen.sum() < spleen.numel() * 0.05
    # the spleen enhances: its windowed intensity is well above the body's fat and air
    assert image[0][spleen].mean() > image[0][~spleen].mean() + 1.0
    assert torch.equal(torch.as_tensor(label.unique()), torch.tensor([0.0, 1.0]))


@pytest.mark.realdata
def test_real_ct_gives_2d_slices_resampled_in_plane_only(realdata):
    """spleen_8 (LAS, 0.785 × 0.785 × 7.5 mm) through the 2D pipeline: 8 mm in plane, its 32 slices
    kept at 7.5 mm, and training slices of the configured size, some through the spleen."""
    cfg = load_config(REPO / "configs" / "smoke_2d.yaml", ["data.crop=classes", "data.samples_per_volume=6"])
    item = {"image": str(realdata / "spleen_8_ct.nii.gz"), "label": str(realdata / "spleen_8_label_orig.nii.gz")}
    volume = evaluation_transform(cfg.data)(item)["image"]
    assert np.allclose(np.diag(volume.affine.numpy())[:3], [8.0, 8.0, 7.5]) and volume.shape[-1] == 32
    transform = training_transform(cfg.data, [0, 1], cfg.labels.classes)  # the file's own values: 1 is spleen
    transform.set_random_state(0)
    slices = transform(item)
    assert all(tuple(s["image"].shape) == (1, *cfg.data.patch_size) for s in slices)
    assert any((s["label"] == 1).any() for s in slices)
