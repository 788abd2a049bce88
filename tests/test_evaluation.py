"""Per-class Dice as ConDistFL reports it (per volume, a class absent from the ground truth is NaN and
left out of its mean); MONAI and torchmetrics agree."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.segmentation import DiceScore

from lightning_fl.config import EvalConfig
from lightning_fl.evaluation import dice_per_class, evaluate, nanmean


def _label_maps(seed: int, shape=(3, 1, 12, 10, 8), classes=6):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.7, label, torch.randint(classes, shape, generator=g))
    return pred, label


def test_monai_and_torchmetrics_per_volume_dice_agree():
    pred, label = _label_maps(0)
    classes = [1, 2, 3, 4, 5]
    ours = dice_per_class(pred, label, classes)  # [volumes, classes]
    metric = DiceScore(
        num_classes=6, include_background=False, average="none", input_format="index", aggregation_level="samplewise"
    )
    for volume in range(pred.shape[0]):
        theirs = metric(pred[volume : volume + 1, 0], label[volume : volume + 1, 0])
        torch.testing.assert_close(ours[volume], theirs.float(), rtol=1e-6, atol=1e-6)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    label = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    label[0, :, :3] = 2  # class 2 only in the first volume; class 3 nowhere
    pred = label.clone()
    pred[1, :, :1] = 2  # a false positive where the truth has no class 2
    dice = dice_per_class(pred, label, [2, 3])
    assert dice[0, 0] == 1.0 and math.isnan(dice[1, 0]) and dice[:, 1].isnan().all()
    assert nanmean(dice[:, 0].tolist()) == 1.0 and math.isnan(nanmean(dice[:, 1].tolist()))


class _Oracle(torch.nn.Module):
    """Logits that put the true class first: a model that is always right."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(image[:, 0].long(), self.num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("roi", [[8, 8, 8], [16, 16, 16]])
def test_sliding_window_evaluation_of_a_perfect_model(roi):
    from monai.data import MetaTensor

    _, label = _label_maps(1, shape=(1, 1, 20, 18, 9), classes=4)
    batches = [{"image": MetaTensor(label.float()), "label": MetaTensor(label.float())}]
    eval_cfg = OmegaConf.structured(EvalConfig(roi_size=roi, overlap=0.25, sw_batch_size=2))
    scores = evaluate(_Oracle(4), batches, [1, 3], eval_cfg, prepare=lambda x: x)
    assert scores == {1: [1.0], 3: [1.0]}
    organ_level = evaluate(_Oracle(4), batches, [1], eval_cfg, prepare=lambda x: x, pred_lut=torch.tensor([0, 1, 1, 3]))
    assert organ_level[1][0] < 1.0  # class 2 predicted as 1 now counts against class 1's Dice
