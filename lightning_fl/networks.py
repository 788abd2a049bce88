"""MONAI DynUNet built from the `model` config group (presets in `configs/model/`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from omegaconf import DictConfig

from lightning_fl.config import ConfigError


def build_network(model: DictConfig, in_channels: int, out_channels: int) -> DynUNet:
    """A DynUNet whose upsampling mirrors its strides; in training mode with deep supervision it
    returns the heads stacked as `[B, 1 + heads, C, *S]`, all at full resolution."""
    if len(model.kernel_size) != len(model.strides) or len(model.filters) != len(model.strides):
        raise ConfigError(
            f"model.kernel_size, model.strides and model.filters need one entry per level, got "
            f"{len(model.kernel_size)}, {len(model.strides)} and {len(model.filters)}"
        )
    heads = model.deep_supervision_heads
    if not 0 <= heads <= len(model.strides) - 2:
        raise ConfigError(
            f"model.deep_supervision_heads must lie in [0, {len(model.strides) - 2}] for "
            f"{len(model.strides)} levels, got {heads}"
        )
    net = DynUNet(
        spatial_dims=len(model.strides[0]),
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[list(k) for k in model.kernel_size],
        strides=[list(s) for s in model.strides],
        upsample_kernel_size=[list(s) for s in model.strides[1:]],
        filters=list(model.filters),
        norm_name=model.norm,
        deep_supervision=heads > 0,
        deep_supr_num=max(heads, 1),
        res_block=model.res_block,
    )
    if model.channels_last:  # measurably faster 3D convolutions with oneDNN and cuDNN
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def size_divisor(model: DictConfig) -> list[int]:
    """Each spatial size the network accepts must be a multiple of these (product of strides)."""
    return [math.prod(s[axis] for s in model.strides) for axis in range(len(model.strides[0]))]


def check_size(model: DictConfig, size: Sequence[int], key: str) -> None:
    divisor = size_divisor(model)
    if len(size) != len(divisor) or any(n % d for n, d in zip(size, divisor)):
        raise ConfigError(f"{key}={list(size)} must be a multiple of {divisor} (the product of model.strides)")
    if math.prod(n // d for n, d in zip(size, divisor)) < 2:  # instance norm needs 2 voxels at the bottom
        raise ConfigError(f"{key}={list(size)} leaves one voxel at the network's deepest level; use at least twice {divisor}")
