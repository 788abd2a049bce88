"""The phantoms' lesions against the published statistics they are drawn from (synthetic.LESIONS),
their anatomy (attached to their organ, exophytic where drawn so), the contrast phases' HU, and the
demo federation's split sizes."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from lightning_fl.config import ScannerConfig, load_config
from lightning_fl.data import synthetic
from lightning_fl.data.synthetic import LESIONS, TUMOR_PREVALENCE, draw_lesions, make_phantom, tumor_probabilities
from lightning_fl.labels import LabelSpace

CLASSES = ("background", "liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor")
TUMORS = {"liver_tumor": "liver", "pancreas_tumor": "pancreas", "kidney_tumor": "kidney"}
EVERY_TUMOUR = {organ: 1.0 for organ in TUMORS.values()}
NO_TUMOUR = {organ: 0.0 for organ in TUMORS.values()}
DRAWS = 4000


@pytest.fixture(scope="module")
def labels() -> LabelSpace:
    return LabelSpace(CLASSES, TUMORS)


@pytest.fixture(scope="module")
def drawn() -> dict[str, list[list[synthetic.Lesion]]]:
    """Many organs' lesion plans, per organ: the sampler alone, no painting."""
    rng = np.random.default_rng(0)
    return {organ: [draw_lesions(rng, organ) for _ in range(DRAWS)] for organ in LESIONS}


def diameters(plans):
    return np.array([lesion.diameter_mm for plan in plans for lesion in plan])


# ---------------------------------------------------------------------------------------------- statistics


def test_kidney_tumours_follow_kits19(drawn):
    """KiTS19 training set: radiographic size median 4.0 cm, IQR 2.5-5.6, range 1.2-16.2 cm; one
    tumour in 201 of 210 patients; necrosis in 23 %."""
    sizes = diameters(drawn["kidney"])
    assert np.median(sizes) == pytest.approx(40.0, rel=0.05)
    q1, q3 = np.percentile(sizes, [25, 75])
    assert q1 == pytest.approx(25.0, rel=0.08) and q3 == pytest.approx(56.0, rel=0.08)
    assert sizes.min() >= 12.0 and sizes.max() <= 120.0
    single = np.mean([len(plan) == 1 for plan in drawn["kidney"]])
    assert single == pytest.approx(201 / 210, abs=0.015)
    lesions = [lesion for plan in drawn["kidney"] for lesion in plan]
    assert np.mean([lesion.necrotic for lesion in lesions]) == pytest.approx(0.23, abs=0.03)
    assert all(not lesion.necrotic for lesion in lesions if lesion.diameter_mm < 40.0)
    assert np.mean([lesion.exophytic for lesion in lesions]) == pytest.approx(0.5, abs=0.03)


def test_pancreatic_masses_follow_msd_task07(drawn):
    """MSD Task07: one mass per case, tumour volume median 6 cm³ (a 22.5 mm sphere), 0.4-732 cm³;
    some cystic."""
    assert all(len(plan) == 1 for plan in drawn["pancreas"])
    sizes = diameters(drawn["pancreas"])
    volume_cm3 = np.pi / 6 * (sizes / 10) ** 3
    assert np.median(volume_cm3) == pytest.approx(6.0, rel=0.15)
    assert volume_cm3.min() >= 0.35 and sizes.max() <= 60.0
    assert np.mean([p[0].cystic for p in drawn["pancreas"]]) == pytest.approx(
        LESIONS["pancreas"].cystic_probability, abs=0.03
    )
    assert not any(p[0].exophytic or p[0].necrotic for p in drawn["pancreas"])


def test_liver_lesions_are_often_several_and_span_sub_centimetre_to_over_ten(drawn):
    """LiTS: one or many lesions per liver, from under 1 cm to over 10 cm."""
    counts = np.array([len(plan) for plan in drawn["liver"]])
    assert 0.5 <= np.mean(counts > 1) <= 0.8 and counts.max() == len(LESIONS["liver"].count_weights)
    sizes = diameters(drawn["liver"])
    assert np.mean(sizes < 10) > 0.02 and np.mean(sizes > 100) > 0.002
    assert sizes.min() >= 5.0 and sizes.max() <= 120.0
    lesions = [lesion for plan in drawn["liver"] for lesion in plan]
    assert any(lesion.necrotic for lesion in lesions) and not any(lesion.exophytic for lesion in lesions)


def test_a_sites_own_tumours_come_at_its_datasets_prevalence(labels):
    assert tumor_probabilities(["kidney", "kidney_tumor"], labels, 0.05) == {
        "liver": 0.05,
        "kidney": 1.0,
        "pancreas": 0.05,
    }
    assert tumor_probabilities(["liver", "liver_tumor"], labels, 0.05)["liver"] == TUMOR_PREVALENCE["liver"] == 0.9
    assert tumor_probabilities(["liver", "spleen", "pancreas", "kidney"], labels, 0.1) == {o: 0.1 for o in EVERY_TUMOUR}


# ---------------------------------------------------------------------------------------------- anatomy


def scanner(**overrides):
    cfg = OmegaConf.structured(ScannerConfig)
    cfg.spacing_mm = [3.0, 3.0, 4.0]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def phantom_pairs(labels):
    """(with every tumour, without any) from the same generator state: lesions come last, so the
    second is the first's anatomy before its lesions were painted."""
    pairs = []
    for seed in range(6):
        with_tumours = make_phantom(np.random.default_rng(seed), scanner(), labels, EVERY_TUMOUR)
        without = make_phantom(np.random.default_rng(seed), scanner(), labels, NO_TUMOUR)
        pairs.append((with_tumours, without))
    return pairs


def test_lesions_stay_attached_to_their_organ_and_bulge_only_into_fat(phantom_pairs, labels):
    outside_kidney = []
    for (_, label, _), (_, anatomy, _) in phantom_pairs:
        for tumour, organ in TUMORS.items():
            mask = label == labels.index(tumour)
            assert mask.any(), tumour
            outline = anatomy == labels.index(organ)
            components, count = ndimage.label(mask)
            for i in range(1, count + 1):  # every piece of a lesion touches its organ
                piece = components == i
                assert (ndimage.binary_dilation(piece) & (label == labels.index(organ))).any() or (
                    piece & outline
                ).any()
            beyond = mask & ~outline
            if organ == "liver":
                assert not beyond.any()  # liver lesions lie within the liver's outline
            else:  # masses may push into the fat around their organ, never into another structure
                assert np.all(anatomy[beyond] == 0), tumour
            if organ == "kidney":
                outside_kidney.append(beyond.sum() / mask.sum())
        # nothing but lesions changed between the two
        changed = label != anatomy
        assert np.isin(label[changed], [labels.index(t) for t in TUMORS]).all()
    assert max(outside_kidney) > 0.25  # exophytic kidney tumours bulge out of the kidney
    assert min(outside_kidney) < max(outside_kidney)


def test_lesions_are_darker_than_their_organ_in_the_portal_venous_phase(phantom_pairs, labels):
    for (image, label, _), _ in phantom_pairs:
        for tumour, organ in (("liver_tumor", "liver"), ("pancreas_tumor", "pancreas")):
            core = ndimage.binary_erosion(label == labels.index(organ), iterations=2)
            lesion = label == labels.index(tumour)
            if lesion.sum() > 30 and core.sum() > 30:
                assert image[lesion].mean() < image[core].mean() - 10, tumour


def test_unenhanced_phase_brings_the_organs_close_to_each_other_and_to_muscle(labels):
    def organ_means(phase):
        image, label, _ = make_phantom(np.random.default_rng(11), scanner(phase=phase), labels, NO_TUMOUR)
        means = {}
        for organ in ("liver", "spleen", "pancreas", "kidney"):
            core = ndimage.distance_transform_edt(label == labels.index(organ)) >= 2
            means[organ] = float(image[core].mean())
        return means

    enhanced, plain = organ_means("portal_venous"), organ_means("unenhanced")
    assert max(enhanced.values()) - min(enhanced.values()) > 45
    assert max(plain.values()) - min(plain.values()) < 40
    assert 45 <= plain["liver"] <= 73 and 20 <= plain["kidney"] <= 40  # Boyce 2010; PubMed 21388763
    assert plain["spleen"] < plain["liver"]  # Park 2011: 1-18 HU below the liver
    assert all(v < 80 for v in plain.values()) and all(v > 85 for k, v in enhanced.items() if k != "kidney")


def test_habitus_and_field_of_view_follow_the_scanner(labels):
    small = make_phantom(np.random.default_rng(2), scanner(), labels, NO_TUMOUR)
    large = make_phantom(
        np.random.default_rng(2),
        scanner(fov_mm=[360.0, 280.0, 200.0], body_scale=[1.1, 1.1], fat_mm=[40.0, 40.0]),
        labels,
        NO_TUMOUR,
    )
    assert large[0].shape == (120, 93, 50) and small[0].shape == (100, 80, 55)

    def fat(image):
        return ((image > -150) & (image < -60)).sum() * 36.0  # mm³ per voxel at 3 × 3 × 4

    assert fat(large[0]) > 1.3 * fat(small[0])
    with pytest.raises(ValueError, match="phase"):
        make_phantom(np.random.default_rng(0), scanner(phase="arterial"), labels, NO_TUMOUR)


# ---------------------------------------------------------------------------------------------- splits


def test_demo_splits_can_tell_methods_apart():
    """≥ 12 test cases per site and per external site, ≥ 4 validation cases per site, training
    counts that differ between sites, and an out-of-federation external site without contrast."""
    cfg = load_config()
    scanners = cfg.data.synthetic.scanners
    sites = [s.name for s in cfg.data.sites]
    assert all(scanners[s].test >= 12 and scanners[s].validation >= 4 for s in sites)
    assert len({scanners[s].train for s in sites}) >= 3
    external = [s.name for s in cfg.data.external]
    assert len(external) >= 2 and all(
        scanners[s].test >= 12 and scanners[s].train == scanners[s].validation == 0 for s in external
    )
    assert {scanners[s].phase for s in external} == {"portal_venous", "unenhanced"}
