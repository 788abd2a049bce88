"""The synthetic federation: files like real data, per-site partial labels, plausible CT and anatomy."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes
from omegaconf import OmegaConf
from scipy import ndimage

from lightning_fl.config import ScannerConfig, SiteConfig, SyntheticConfig
from lightning_fl.data import synthetic
from lightning_fl.data.synthetic import make_phantom, write_federation
from lightning_fl.labels import LabelSpace, LabelSpaceError

CLASSES = ("background", "liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor")
TUMORS = {"liver_tumor": "liver", "pancreas_tumor": "pancreas", "kidney_tumor": "kidney"}
SITE_CLASSES = {
    "liver": ["liver", "liver_tumor"],
    "spleen": ["spleen"],
    "pancreas": ["pancreas", "pancreas_tumor"],
    "kidney": ["kidney", "kidney_tumor"],
    "external": ["liver", "spleen", "pancreas", "kidney"],
}
EVERY_TUMOUR = {organ: 1.0 for organ in ("liver", "pancreas", "kidney")}
NO_TUMOUR = {organ: 0.0 for organ in EVERY_TUMOUR}
COARSE = [4.0, 4.0, 5.0]
# Organ means may leave the drawn range by the smooth texture, noise and the PSF blur near the edge.
HU_TOLERANCE = 5.0


@pytest.fixture(scope="module")
def labels() -> LabelSpace:
    return LabelSpace(CLASSES, TUMORS)


def make_synthetic(seed: int = 0, **scanner_overrides):
    cfg = OmegaConf.structured(SyntheticConfig)
    cfg.seed = seed
    cfg.incidental_tumor_probability = 1.0
    for i, name in enumerate(SITE_CLASSES):
        external = name == "external"
        scanner = OmegaConf.structured(ScannerConfig)
        scanner.train, scanner.validation, scanner.test = (0, 0, 2) if external else (2, 1, 1)
        scanner.spacing_mm = [3.0, 3.5, 6.0] if name == "spleen" else COARSE
        scanner.hu_offset = 3.0 * i
        scanner.noise_hu = 10.0 + 2 * i
        for key, value in scanner_overrides.items():
            setattr(scanner, key, value)
        cfg.scanners[name] = scanner
    return cfg


def make_sites():
    sites = []
    for name, classes in SITE_CLASSES.items():
        site = OmegaConf.structured(SiteConfig)
        site.name, site.datalist, site.classes = name, f"{name}.json", classes
        sites.append(site)
    return sites


@pytest.fixture(scope="module")
def federation(tmp_path_factory, labels) -> Path:
    out = tmp_path_factory.mktemp("fed") / "data"
    write_federation(out, make_synthetic(), make_sites(), labels)
    return out


@pytest.fixture(scope="module")
def phantom(labels):
    scanner = OmegaConf.structured(ScannerConfig)
    scanner.spacing_mm = [3.0, 3.0, 4.0]
    return make_phantom(np.random.default_rng(7), scanner, labels, EVERY_TUMOUR)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def datalist_cases(federation: Path, site: str):
    data = json.loads((federation / f"{site}.json").read_text())
    return data, [e for split in ("training", "validation", "testing") for e in data[split]]


# ---------------------------------------------------------------------------------------------- files


def test_datalists_list_every_case_with_relative_paths(federation):
    cfg = make_synthetic()
    for site, classes in SITE_CLASSES.items():
        data, cases = datalist_cases(federation, site)
        scanner = cfg.scanners[site]
        assert data["name"] == site and data["classes"] == classes
        assert [len(data[s]) for s in ("training", "validation", "testing")] == [
            scanner.train,
            scanner.validation,
            scanner.test,
        ]
        for entry in cases:
            for kind in ("image", "label"):
                assert not Path(entry[kind]).is_absolute()
                assert (federation / entry[kind]).is_file()
                assert entry[kind].startswith(f"{site}/{kind}s/{site}_")
        assert len({e["image"] for e in cases}) == len(cases)
    assert not list(federation.parent.glob(".data.tmp-*"))


def test_nifti_geometry_is_ras_with_the_scanner_spacing(federation):
    cfg = make_synthetic()
    for site in SITE_CLASSES:
        for entry in datalist_cases(federation, site)[1]:
            image, label = nib.load(federation / entry["image"]), nib.load(federation / entry["label"])
            spacing = list(cfg.scanners[site].spacing_mm)
            for img in (image, label):
                assert aff2axcodes(img.affine) == ("R", "A", "S")
                np.testing.assert_allclose(img.header.get_zooms(), spacing)
                np.testing.assert_allclose(np.abs(img.affine[:3, 3]) * 2, (np.array(img.shape) - 1) * spacing)
            assert image.shape == label.shape
            assert image.get_data_dtype() == np.int16 and np.asanyarray(image.dataobj).dtype == np.int16
            assert label.get_data_dtype() == np.uint8 and np.asanyarray(label.dataobj).dtype == np.uint8


def test_field_of_view_sets_the_native_shape(labels):
    scanner = OmegaConf.structured(ScannerConfig)  # 2 × 2 × 3 mm
    image, label, affine = make_phantom(np.random.default_rng(0), scanner, labels, EVERY_TUMOUR)
    assert image.shape == label.shape == (150, 120, 73)
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 3.0])


def test_each_site_labels_only_its_own_classes(federation, labels):
    for site, classes in SITE_CLASSES.items():
        allowed = {0} | {labels.index(c) for c in classes}
        for entry in datalist_cases(federation, site)[1]:
            present = set(np.unique(np.asanyarray(nib.load(federation / entry["label"]).dataobj)).tolist())
            assert present <= allowed, (site, present)
            if site != "external":
                assert labels.index(classes[0]) in present  # every image contains the site's organ


def test_external_site_labels_all_organs_with_tumours_merged(federation, labels):
    organs = {labels.index(o) for o in ("liver", "spleen", "pancreas", "kidney")}
    for entry in datalist_cases(federation, "external")[1]:
        present = set(np.unique(np.asanyarray(nib.load(federation / entry["label"]).dataobj)).tolist())
        assert present == {0} | organs


def test_draw_case_gives_the_written_image_and_the_full_label_the_site_annotated(federation, labels):
    cfg, site = make_synthetic(), make_sites()[0]
    image, full, _ = synthetic.draw_case(cfg, site, 0, labels)
    assert set(np.unique(full)) == set(range(len(CLASSES)))  # every organ and, at p = 1, every tumour
    written = np.asanyarray(nib.load(federation / datalist_cases(federation, site.name)[1][0]["label"]).dataobj)
    assert np.array_equal(written, labels.annotation_lut(site.classes)[full])
    written_image = nib.load(federation / datalist_cases(federation, site.name)[1][0]["image"]).dataobj
    assert np.array_equal(np.asanyarray(written_image), image)
    assert set(np.unique(written)) == {0, labels.index("liver"), labels.index("liver_tumor")}


# ---------------------------------------------------------------------------------------------- physics


def test_organ_hu_in_portal_venous_ranges(phantom, labels):
    image, label, _ = phantom
    expected = {"liver": (100, 120), "spleen": (110, 130), "pancreas": (90, 110), "kidney": (130, 200)}
    for organ, (lo, hi) in expected.items():
        core = ndimage.distance_transform_edt(label == labels.index(organ)) >= 2  # away from the PSF edge
        assert core.sum() > 20, organ
        assert lo - HU_TOLERANCE <= image[core].mean() <= hi + HU_TOLERANCE, (organ, image[core].mean())


def test_air_outside_the_body_and_dense_bone(phantom):
    image = phantom[0]
    corners = np.concatenate(
        [image[:6, :6].ravel(), image[-6:, :6].ravel(), image[:6, -6:].ravel(), image[-6:, -6:].ravel()]
    )
    assert abs(corners.mean() + 1000) < 5
    assert (image >= 300).sum() > 500
    assert image.max() >= 700


def test_tumours_touch_their_organ_and_liver_lesions_lie_inside_it(phantom, labels):
    label = phantom[1]
    for tumour, organ in TUMORS.items():
        mask = label == labels.index(tumour)
        assert mask.any(), tumour
        shell = ndimage.binary_dilation(mask) & ~mask
        assert (label[shell] == labels.index(organ)).any(), tumour
        if organ == "liver":  # the masses that may bulge into fat are tests/test_lesions.py's
            assert np.all(np.isin(label[shell], [labels.index(organ), 0])), tumour


def test_no_tumours_when_probability_is_zero(labels):
    scanner = OmegaConf.structured(ScannerConfig)
    scanner.spacing_mm = COARSE
    label = make_phantom(np.random.default_rng(1), scanner, labels, NO_TUMOUR)[1]
    assert not np.isin(label, [labels.index(t) for t in TUMORS]).any()


def test_scanner_offset_and_contrast_change_the_measured_hu(labels):
    def liver_mean(**overrides) -> float:
        scanner = OmegaConf.structured(ScannerConfig)
        scanner.spacing_mm = COARSE
        for key, value in overrides.items():
            setattr(scanner, key, value)
        image, label, _ = make_phantom(np.random.default_rng(3), scanner, labels, NO_TUMOUR)
        return float(image[ndimage.binary_erosion(label == labels.index("liver"))].mean())

    base = liver_mean()
    assert liver_mean(hu_offset=40.0) == pytest.approx(base + 40.0, abs=0.5)
    assert liver_mean(contrast_scale=1.3) == pytest.approx(base * 1.3, rel=0.05)


# ---------------------------------------------------------------------------------------------- anatomy


def test_organ_positions_follow_ras_anatomy(phantom, labels):
    _, label, affine = phantom
    centre = {o: world_centroid(label == labels.index(o), affine) for o in ("liver", "spleen", "pancreas", "kidney")}
    assert centre["liver"][0] > 20 > -20 > centre["spleen"][0]  # liver on the patient's right (+x in RAS)
    assert centre["kidney"][1] < centre["pancreas"][1]  # kidneys posterior to the pancreas
    assert centre["kidney"][2] < centre["liver"][2]  # and below the liver
    assert centre["liver"][2] > 0 and centre["spleen"][2] > 0  # upper abdomen


def test_pancreas_is_elongated(phantom, labels):
    _, label, affine = phantom
    points = np.argwhere(label == labels.index("pancreas")) * np.diag(affine)[:3]
    points -= points.mean(axis=0)
    extents = np.ptp(points @ np.linalg.eigh(np.cov(points.T))[1], axis=0)
    assert extents.max() >= 2.5 * extents.min()


def test_right_kidney_is_lower_than_left(phantom, labels):
    _, label, affine = phantom
    kidney = label == labels.index("kidney")
    right, left = kidney.copy(), kidney.copy()
    midline = int(round(-affine[0, 3] / affine[0, 0]))
    right[:midline], left[midline:] = False, False
    assert world_centroid(right, affine)[2] < world_centroid(left, affine)[2]


# ---------------------------------------------------------------------------------------------- behaviour


def test_same_seed_same_phantom_and_different_seed_differs(labels):
    scanner = OmegaConf.structured(ScannerConfig)
    scanner.spacing_mm = COARSE
    a, b, c = (make_phantom(np.random.default_rng(s), scanner, labels, EVERY_TUMOUR) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_federation_is_deterministic_given_the_seed(tmp_path, labels, federation):
    sites = make_sites()[:1]
    cfg = make_synthetic()
    write_federation(tmp_path / "same", cfg, sites, labels)
    write_federation(tmp_path / "other", make_synthetic(seed=1), sites, labels)
    for entry in datalist_cases(federation, "liver")[1]:
        for kind in ("image", "label"):
            ref = np.asanyarray(nib.load(federation / entry[kind]).dataobj)
            assert np.array_equal(ref, np.asanyarray(nib.load(tmp_path / "same" / entry[kind]).dataobj))
        assert not np.array_equal(
            np.asanyarray(nib.load(federation / entry["image"]).dataobj),
            np.asanyarray(nib.load(tmp_path / "other" / entry["image"]).dataobj),
        )


def test_existing_output_folder_is_refused(tmp_path, labels):
    out = tmp_path / "data"
    out.mkdir()
    with pytest.raises(FileExistsError, match=str(out)):
        write_federation(out, make_synthetic(), make_sites(), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_failure_leaves_nothing_behind(tmp_path, labels, monkeypatch):
    calls = []

    def failing_save(path, data, affine):
        calls.append(path)
        if len(calls) > 3:
            raise OSError("disk full")

    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 1)  # in-process, where the patch applies
    monkeypatch.setattr(synthetic, "_save_nifti", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_federation(tmp_path / "data", make_synthetic(), make_sites(), labels)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_generations_staging_folder_is_cleaned_and_a_running_ones_kept(tmp_path, labels, monkeypatch):
    killed, running = tmp_path / ".data.tmp-999999999", tmp_path / f".data.tmp-{os.getppid()}"  # no such pid; alive
    for staging in (killed, running):
        staging.mkdir()
        (staging / "liver.json").write_text("{}")
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 1)
    write_federation(tmp_path / "data", make_synthetic(), make_sites(), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", running.name])


def test_failure_in_a_worker_process_leaves_nothing_behind(tmp_path, labels):
    cfg = make_synthetic()
    cfg.scanners["kidney"].spacing_mm = [0.0, 4.0, 5.0]  # fails inside the worker that draws it
    with pytest.raises(Exception):  # noqa: B017 (whatever the worker raises, nothing may be left)
        write_federation(tmp_path / "data", cfg, make_sites(), labels)
    assert list(tmp_path.iterdir()) == []


def test_config_errors_are_clear(tmp_path, labels):
    no_spleen = LabelSpace(("background", "liver", "pancreas", "kidney"), {})
    with pytest.raises(LabelSpaceError, match="spleen"):
        write_federation(tmp_path / "a", make_synthetic(), make_sites()[:1], no_spleen)
    cfg = make_synthetic()
    del cfg.scanners["kidney"]
    with pytest.raises(ValueError, match="kidney"):
        write_federation(tmp_path / "b", cfg, make_sites(), labels)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_datalists_are_refused(tmp_path, labels):
    sites = make_sites()[:2]
    sites[1].datalist = sites[0].datalist
    with pytest.raises(ValueError, match="datalist"):
        write_federation(tmp_path / "data", make_synthetic(), sites, labels)


def test_progress_bar_only_when_asked_and_on_a_terminal(tmp_path, labels, capsys, monkeypatch):
    cfg, sites = make_synthetic(), make_sites()[:1]
    write_federation(tmp_path / "quiet", cfg, sites, labels)
    write_federation(tmp_path / "log", cfg, sites, labels, progress=True)  # stderr is no terminal here
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    write_federation(tmp_path / "loud", cfg, sites, labels, progress=True)
    assert "4/4" in terminal.getvalue()
