"""Sliding-window inference and per-class Dice with the spec's conventions (spec §3).

Dice is computed per volume; a class absent from a volume's ground truth gives NaN there and is
left out of that class's mean over cases. A site reports only the classes it labels; the external
set is scored per organ, tumours merged into their organ in the prediction as in its labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from omegaconf import DictConfig
from torch import Tensor, nn


def predict_labels(model: nn.Module, image: Tensor, eval_cfg: DictConfig) -> Tensor:
    """Argmax class map `[B, 1, *S]` of a whole volume, by Gaussian-blended sliding windows."""
    logits = sliding_window_inference(
        image, roi_size=list(eval_cfg.roi_size), sw_batch_size=eval_cfg.sw_batch_size, predictor=model,
        overlap=eval_cfg.overlap, mode=eval_cfg.blend_mode,
    )
    return logits.argmax(1, keepdim=True)


def dice_per_class(pred: Tensor, label: Tensor, classes: Sequence[int]) -> Tensor:
    """Dice `[B, len(classes)]` of class maps `[B, 1, *S]`; NaN where a class is absent from the label."""
    pred_onehot = torch.cat([pred == c for c in classes], dim=1)
    label_onehot = torch.cat([label == c for c in classes], dim=1)
    return compute_dice(pred_onehot, label_onehot, include_background=True, ignore_empty=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], classes: Sequence[int], eval_cfg: DictConfig,
    prepare: Callable[[Tensor], Tensor], pred_lut: Tensor | None = None,
) -> dict[int, list[float]]:
    """Per-case Dice of each class over a loader of whole volumes.

    `prepare` moves an image to the model's device and memory format; `pred_lut` remaps predicted
    classes first (organ-level scoring of the external set).
    """
    scores: dict[int, list[float]] = {c: [] for c in classes}
    for batch in batches:
        image = prepare(batch["image"].as_tensor())
        label = batch["label"].as_tensor().to(image.device).long()
        pred = predict_labels(model, image, eval_cfg)
        if pred_lut is not None:
            pred = pred_lut.to(pred.device)[pred]
        for c, values in zip(classes, dice_per_class(pred, label, classes).T):
            scores[c] += values.tolist()
    return scores


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (a class no case contains)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
