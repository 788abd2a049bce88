"""MONAI dictionary pipelines built from the `data` config group: the ConDistFL preprocessing and
training augmentation, with every setting in the config.

The deterministic preprocessing (load, RAS, resample, window, pad, foreground indices) comes
first so that a cached dataset keeps its output; random cropping and augmentation follow. Images
of any orientation, spacing and integer or float type, and labels of any integer type, come out
as float32 RAS volumes on the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import monai.transforms as mt
import numpy as np
from monai.utils import convert_to_dst_type
from omegaconf import DictConfig

from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelMap

KEYS = ("image", "label")


class RemapLabelsd(mt.MapTransform):
    """Native label values → unified classes (a `LabelMap`), before resampling; a value the map
    does not list is an error that names the file."""

    def __init__(self, mapping: LabelMap, key: str = "label") -> None:
        super().__init__([key])
        self.mapping = mapping

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.keys:
            label = out[key]
            native = label.numpy().astype(np.int64)
            unexpected = self.mapping.unexpected(native)
            if unexpected:
                source = label.meta.get("filename_or_obj", key)
                raise DatalistError(
                    f"{source} has label values {unexpected} that the label map '{self.mapping.name}' does not list"
                )
            out[key] = convert_to_dst_type(self.mapping.apply(native), label)[0]  # keeps the header
        return out


def preprocessing(
    data: DictConfig, keys: Sequence[str] = KEYS, label_map: LabelMap | None = None
) -> list[mt.Transform]:
    """NIfTI on disk → channel-first RAS volume at `data.spacing_mm`, intensities windowed and scaled;
    `keys` without "label" for images alone (inference)."""
    window = data.intensity
    keys = tuple(keys)
    modes = tuple("nearest" if key == "label" else "bilinear" for key in keys)
    return [
        mt.LoadImaged(keys, image_only=True),
        mt.EnsureChannelFirstd(keys),
        *([RemapLabelsd(label_map)] if label_map is not None else []),
        mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys, pixdim=list(data.spacing_mm), mode=modes),
        mt.ScaleIntensityRanged(
            "image",
            a_min=window.hu_min,
            a_max=window.hu_max,
            clip=True,
            b_min=(window.hu_min - window.center) / window.scale,
            b_max=(window.hu_max - window.center) / window.scale,
        ),
        mt.EnsureTyped(keys, dtype=np.float32, track_meta=True),
    ]


def _augmentation(aug: DictConfig, dims: int) -> list[mt.Transform]:
    """nnU-Net-style augmentations of `dims`-D patches (a 2D patch rotates in its plane); a transform
    whose probability is 0 is left out."""
    linear = "trilinear" if dims == 3 else "bilinear"
    interp = (linear, "nearest")
    rotate = math.radians(aug.rotate_degrees)
    spatial: list[tuple[float, mt.Transform]] = [
        (
            aug.rotate_prob,
            mt.RandRotated(
                KEYS, range_x=rotate, range_y=rotate, range_z=rotate, prob=aug.rotate_prob, mode=("bilinear", "nearest")
            ),
        ),
        (
            aug.zoom_prob,
            mt.RandZoomd(KEYS, min_zoom=aug.zoom_range[0], max_zoom=aug.zoom_range[1], prob=aug.zoom_prob, mode=interp),
        ),
    ]
    intensity: list[tuple[float, mt.Transform]] = [
        (aug.noise_prob, mt.RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std)),
        (
            aug.smooth_prob,
            mt.RandGaussianSmoothd(
                "image",
                sigma_x=tuple(aug.smooth_sigma),
                sigma_y=tuple(aug.smooth_sigma),
                sigma_z=tuple(aug.smooth_sigma),
                prob=aug.smooth_prob,
            ),
        ),
        (
            aug.brightness_prob,
            mt.RandScaleIntensityd(
                "image", factors=(aug.brightness_range[0] - 1, aug.brightness_range[1] - 1), prob=aug.brightness_prob
            ),
        ),
        (
            aug.contrast_prob,
            mt.RandScaleIntensityFixedMeand(
                "image",
                factors=(aug.contrast_range[0] - 1, aug.contrast_range[1] - 1),
                preserve_range=True,
                prob=aug.contrast_prob,
            ),
        ),
        (
            aug.lowres_prob,
            mt.RandSimulateLowResolutiond(
                "image", zoom_range=tuple(aug.lowres_range), upsample_mode=linear, prob=aug.lowres_prob
            ),
        ),
        (
            aug.gamma_prob,
            mt.RandAdjustContrastd("image", gamma=tuple(aug.gamma_range), retain_stats=True, prob=aug.gamma_prob),
        ),
        (
            aug.inverse_gamma_prob,
            mt.RandAdjustContrastd(
                "image", gamma=tuple(aug.gamma_range), invert_image=True, retain_stats=True, prob=aug.inverse_gamma_prob
            ),
        ),
    ]
    flips = [(aug.flip_prob, mt.RandFlipd(KEYS, spatial_axis=axis, prob=aug.flip_prob)) for axis in range(dims)]
    return [t for p, t in spatial + intensity + flips if p > 0]


def training_transform(data: DictConfig, classes: Sequence[int], class_names: Sequence[str]) -> mt.Compose:
    """Preprocessing, then `samples_per_volume` random patches and augmentation. Patch centres:
    `data.crop: pos_neg` (the paper's) draws foreground and background voxels at
    `data.pos_neg_ratio`; `classes` (nnU-Net's oversampling) draws each of `classes` (background
    and the site's labelled classes, by index into `class_names`) at its `data.class_ratios` share,
    among those the case contains, so a small tumour is centred as often as its organ. A 2D patch
    (`data.patch_size` of two values) is an axial slice: cropped one voxel thick, then the axis dropped."""
    dims = len(data.patch_size)
    size = list(data.patch_size) + ([1] if dims == 2 else [])
    if data.crop == "classes":
        ratios = [
            float(data.class_ratios.get(class_names[c], 1.0)) if c in classes else 0.0 for c in range(max(classes) + 1)
        ]
        indices = mt.ClassesToIndicesd("label", num_classes=len(ratios))
        crop = mt.RandCropByLabelClassesd(
            KEYS,
            label_key="label",
            spatial_size=size,
            ratios=ratios,
            num_classes=len(ratios),
            num_samples=data.samples_per_volume,
            indices_key="label_cls_indices",
            warn=False,
        )
    else:
        pos, neg = data.pos_neg_ratio
        indices = mt.FgBgToIndicesd("label")
        crop = mt.RandCropByPosNegLabeld(
            KEYS,
            label_key="label",
            spatial_size=size,
            pos=pos,
            neg=neg,
            num_samples=data.samples_per_volume,
            fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
        )
    slices = [mt.SqueezeDimd(KEYS, dim=-1)] if dims == 2 else []
    return mt.Compose(
        preprocessing(data)
        + [mt.SpatialPadd(KEYS, spatial_size=size), indices, crop, *slices]
        + _augmentation(data.augmentation, dims)
    )


def evaluation_transform(data: DictConfig, label_map: LabelMap | None = None) -> mt.Compose:
    """Whole volumes with their labels; `label_map` reads labels in another scheme (evaluate --label-map)."""
    return mt.Compose(preprocessing(data, label_map=label_map))


def inference_transform(data: DictConfig) -> mt.Compose:
    """Images alone; invertible, so predictions go back to each input's own grid."""
    return mt.Compose(preprocessing(data, keys=("image",)))
