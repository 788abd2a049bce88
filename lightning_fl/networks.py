"""MONAI DynUNet built from the `model` config group (presets in `configs/model/`), in 3D or, for a
network of axial slices, in 2D (`model.strides` states which)."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_fl.config import spatial_dims


def build_network(model: DictConfig, in_channels: int, out_channels: int) -> DynUNet:
    """A DynUNet whose upsampling mirrors its strides; in training mode with deep supervision it
    returns the heads stacked as `[B, 1 + heads, C, *S]`, all at full resolution."""
    heads = model.deep_supervision_heads  # the structure was checked with the config (config._check_network)
    net = DynUNet(
        spatial_dims=spatial_dims(model),
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
    return net.to(memory_format=memory_format(model))


def memory_format(model: DictConfig) -> torch.memory_format:
    """channels-last where `model.channels_last` asks for it: measurably faster convolutions with
    oneDNN and cuDNN."""
    if not model.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims(model) == 3 else torch.channels_last


class SliceWise(nn.Module):
    """A 2D network applied to every axial slice of volumes `[B, C, H, W, D]`, giving `[B, K, H, W, D]`:
    an exported 2D model takes a volume as a 3D one does."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, volume: Tensor) -> Tensor:
        b, c, h, w, d = volume.shape
        slices = volume.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        out = self.network(slices)
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)
