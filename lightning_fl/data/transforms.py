"""MONAI dictionary pipelines built from the `data` config group (spec §3).

The deterministic preprocessing (load, RAS, resample, window, pad, foreground indices) comes
first so that `CacheDataset` keeps its output; random cropping and augmentation follow.
"""

from __future__ import annotations

import math

import numpy as np
import monai.transforms as mt
from omegaconf import DictConfig

KEYS = ("image", "label")


def preprocessing(data: DictConfig) -> list[mt.Transform]:
    """NIfTI on disk → channel-first RAS volume at `data.spacing_mm`, intensities windowed and scaled."""
    window = data.intensity
    return [
        mt.LoadImaged(KEYS, image_only=True),
        mt.EnsureChannelFirstd(KEYS),
        mt.Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(KEYS, pixdim=list(data.spacing_mm), mode=("bilinear", "nearest")),
        mt.ScaleIntensityRanged(
            "image", a_min=window.hu_min, a_max=window.hu_max, clip=True,
            b_min=(window.hu_min - window.center) / window.scale,
            b_max=(window.hu_max - window.center) / window.scale,
        ),
        mt.EnsureTyped(KEYS, dtype=np.float32, track_meta=True),
    ]


def _augmentation(aug: DictConfig) -> list[mt.Transform]:
    """nnU-Net-style augmentations; a transform whose probability is 0 is left out."""
    interp = ("trilinear", "nearest")
    rotate = math.radians(aug.rotate_degrees)
    spatial: list[tuple[float, mt.Transform]] = [
        (aug.rotate_prob, mt.RandRotated(KEYS, range_x=rotate, range_y=rotate, range_z=rotate,
                                         prob=aug.rotate_prob, mode=("bilinear", "nearest"))),
        (aug.zoom_prob, mt.RandZoomd(KEYS, min_zoom=aug.zoom_range[0], max_zoom=aug.zoom_range[1],
                                     prob=aug.zoom_prob, mode=interp)),
    ]
    intensity: list[tuple[float, mt.Transform]] = [
        (aug.noise_prob, mt.RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std)),
        (aug.smooth_prob, mt.RandGaussianSmoothd(
            "image", sigma_x=tuple(aug.smooth_sigma), sigma_y=tuple(aug.smooth_sigma),
            sigma_z=tuple(aug.smooth_sigma), prob=aug.smooth_prob)),
        (aug.brightness_prob, mt.RandScaleIntensityd(
            "image", factors=(aug.brightness_range[0] - 1, aug.brightness_range[1] - 1),
            prob=aug.brightness_prob)),
        (aug.contrast_prob, mt.RandScaleIntensityFixedMeand(
            "image", factors=(aug.contrast_range[0] - 1, aug.contrast_range[1] - 1),
            preserve_range=True, prob=aug.contrast_prob)),
        (aug.lowres_prob, mt.RandSimulateLowResolutiond(
            "image", zoom_range=tuple(aug.lowres_range), prob=aug.lowres_prob)),
        (aug.gamma_prob, mt.RandAdjustContrastd(
            "image", gamma=tuple(aug.gamma_range), retain_stats=True, prob=aug.gamma_prob)),
        (aug.inverse_gamma_prob, mt.RandAdjustContrastd(
            "image", gamma=tuple(aug.gamma_range), invert_image=True, retain_stats=True,
            prob=aug.inverse_gamma_prob)),
    ]
    flips = [(aug.flip_prob, mt.RandFlipd(KEYS, spatial_axis=axis, prob=aug.flip_prob)) for axis in range(3)]
    return [t for p, t in spatial + intensity + flips if p > 0]


def training_transform(data: DictConfig) -> mt.Compose:
    pos, neg = data.pos_neg_ratio
    return mt.Compose(
        preprocessing(data)
        + [
            mt.SpatialPadd(KEYS, spatial_size=list(data.patch_size)),
            mt.FgBgToIndicesd("label"),
            mt.RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=list(data.patch_size), pos=pos, neg=neg,
                num_samples=data.samples_per_volume, fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
        ]
        + _augmentation(data.augmentation)
    )


def evaluation_transform(data: DictConfig) -> mt.Compose:
    return mt.Compose(preprocessing(data))
