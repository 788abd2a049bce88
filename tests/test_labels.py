"""The label space derives every site's foreground and background groups from the config."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fl.labels import LabelSpace, LabelSpaceError

CLASSES = ("background", "liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor")
TUMORS = {"liver_tumor": "liver", "pancreas_tumor": "pancreas", "kidney_tumor": "kidney"}


@pytest.fixture
def labels() -> LabelSpace:
    return LabelSpace(CLASSES, TUMORS)


@pytest.mark.parametrize(
    "site,foreground,groups",
    [
        (["liver", "liver_tumor"], [1, 2], [[0], [3], [4, 5], [6, 7]]),
        (["spleen"], [3], [[0], [1, 2], [4, 5], [6, 7]]),
        (["pancreas_tumor", "pancreas"], [4, 5], [[0], [1, 2], [3], [6, 7]]),
        (["kidney", "kidney_tumor"], [6, 7], [[0], [1, 2], [3], [4, 5]]),
    ],
)
def test_spec_sites(labels, site, foreground, groups):
    assert labels.foreground(site) == foreground
    assert labels.background_groups(foreground) == groups


def test_groups_follow_the_config_not_the_paper():
    other = LabelSpace(("background", "lung", "lung_nodule", "heart"), {"lung_nodule": "lung"})
    assert other.background_groups(other.foreground(["heart"])) == [[0], [1, 2]]
    # a site that labels an organ but not its tumour: the tumour is its own group
    assert other.background_groups(other.foreground(["lung"])) == [[0], [2], [3]]


def test_annotation_lut_draws_unlabelled_tumours_as_their_organ(labels):
    full = np.arange(8)
    assert labels.annotation_lut(["spleen"])[full].tolist() == [0, 0, 0, 3, 0, 0, 0, 0]
    organs = ["liver", "spleen", "pancreas", "kidney"]
    assert labels.annotation_lut(organs)[full].tolist() == [0, 1, 1, 3, 4, 4, 6, 6]
    assert labels.organ_lut().tolist() == [0, 1, 1, 3, 4, 4, 6, 6]
    assert labels.organs == organs


@pytest.mark.parametrize(
    "site,message",
    [
        (["liverr"], "unknown class 'liverr'"),
        ([], "at least one class"),
        (["background"], "implicit"),
        (["liver", "liver"], "twice"),
    ],
)
def test_bad_site_tasks(labels, site, message):
    with pytest.raises(LabelSpaceError, match=message):
        labels.foreground(site, where="site 'x'")


@pytest.mark.parametrize(
    "classes,tumors,message",
    [
        (("liver", "background"), {}, "must start with 'background'"),
        (("background", "liver", "liver"), {}, "twice"),
        (("background", "liver"), {"liver_tumor": "liver"}, "not a foreground class"),
        (("background", "a", "b", "c"), {"c": "b", "b": "a"}, "is a tumour"),
    ],
)
def test_bad_label_spaces(classes, tumors, message):
    with pytest.raises(LabelSpaceError, match=message):
        LabelSpace(classes, tumors)
