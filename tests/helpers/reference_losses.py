"""Straightforward implementations of the ConDistFL loss formulas (marginal Dice+CE and ConDist,
`docs/explanation/method.md`): a loop over channels and groups with MONAI's Dice module per channel,
differentiated by autograd. They are the yardstick the fast losses are checked against (tests) and
timed against (`benchmarks/condist_cost.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

_dice = DiceLoss(include_background=True, batch=True, smooth_nr=0.0, smooth_dr=1e-5)


def _mean_channel_dice(pred: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Mean over channels of MONAI's batch Dice loss, one channel at a time."""
    return torch.stack([_dice(p.unsqueeze(1), t.unsqueeze(1)) for p, t in zip(pred, target)]).mean()


def marginal_loss_loop(logits: Tensor, label: Tensor, foreground: Sequence[int], ce: str) -> Tensor:
    num_classes = logits.shape[1]
    background = [c for c in range(num_classes) if c not in foreground]
    prob = torch.softmax(logits, dim=1)
    merged_prob = [sum(prob[:, c] for c in background)] + [prob[:, f] for f in foreground]
    label = label[:, 0].long()
    merged_target = torch.zeros_like(label)
    for k, f in enumerate(foreground, start=1):
        merged_target[label == f] = k
    onehot = [(merged_target == k).to(logits.dtype) for k in range(len(merged_prob))]
    dice = _mean_channel_dice(merged_prob, onehot)
    if ce == "official":
        return dice + F.cross_entropy(torch.stack(merged_prob, 1), merged_target)
    lse_all = torch.logsumexp(logits, dim=1)
    log_merged = [torch.logsumexp(logits[:, background], dim=1) - lse_all]
    log_merged += [logits[:, f] - lse_all for f in foreground]
    return dice + F.nll_loss(torch.stack(log_merged, 1), merged_target)


def condist_loss_loop(
    student: Tensor,
    teacher: Tensor,
    label: Tensor,
    foreground: Sequence[int],
    background: Sequence[int | Sequence[int]],
    temperature: float,
) -> Tensor:
    def conditional(logits: Tensor) -> list[Tensor]:
        q = torch.softmax(logits / temperature, dim=1)
        denom = 1.0 - sum(q[:, f] for f in foreground) + 1e-5
        groups = [[g] if isinstance(g, int) else list(g) for g in background]
        return [sum(q[:, c] for c in g) / denom for g in groups]

    teacher = teacher.detach()
    local = torch.zeros_like(label[:, 0], dtype=torch.bool)
    top = teacher.argmax(1)
    for f in foreground:
        local |= (top == f) | (label[:, 0] == f)
    mask = (~local).to(student.dtype)
    r_s = [r * mask for r in conditional(student)]
    r_t = [r * mask for r in conditional(teacher)]
    return _mean_channel_dice(r_s, r_t)
