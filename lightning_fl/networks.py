"""MONAI DynUNet built from the `model` config group (presets in `configs/model/`)."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from omegaconf import DictConfig


def build_network(model: DictConfig, in_channels: int, out_channels: int) -> DynUNet:
    """A DynUNet whose upsampling mirrors its strides; in training mode with deep supervision it
    returns the heads stacked as `[B, 1 + heads, C, *S]`, all at full resolution."""
    heads = model.deep_supervision_heads  # the structure was checked with the config (config._check_network)
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
