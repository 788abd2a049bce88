"""The two ConDistFL losses: the marginal Dice+CE loss and the conditional-distillation Dice
(`docs/explanation/method.md` gives the formulas); and the teacher terms of the two baselines it is
compared with, plain distillation (KD) and pseudo-labels.

The ConDistFL losses are written as autograd Functions with an analytic backward. One softmax over the classes
feeds every merged sum, and the backward reuses it, so a step makes a few passes over the logits
instead of the dozens an autograd graph of per-channel slices makes. `benchmarks/condist_cost.py`
measures the gain against a per-channel MONAI implementation; `tests/test_losses.py` checks values
and gradients against the golden numbers and against that implementation.

Shapes: logits `[B, C, *S]` (2D or 3D), labels `[B, 1, *S]` holding class indices. Dice is batch
Dice (sums over batch and voxels together), background included, numerator smoothing 0,
denominator smoothing `smooth_dr`, averaged over channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

CE_VARIANTS = ("official", "marginal")
CONDIST_EPS = 1e-5  # keeps 1 - sum_F q away from zero in the conditional probabilities, as ConDistFL does


def deep_supervision_weights(num_heads: int) -> Tensor:
    """Weights 1, 1/2, 1/4, ... normalised to sum 1; head 0 is the full-resolution output."""
    weights = torch.tensor([0.5**level for level in range(num_heads)])
    return weights / weights.sum()


def _flatten(logits: Tensor, label: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Logits `[..., C, N]` in float32 (float64 kept, for gradcheck) and int64 labels `[B, N]`."""
    batch, spatial = logits.shape[0], logits.shape[channel_dim + 1 :]
    if label.shape[0] != batch or label.shape[1] != 1 or label.shape[2:] != spatial:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match logits {tuple(logits.shape)}: "
            f"expected [B, 1, *spatial] = [{batch}, 1, {', '.join(map(str, spatial))}]"
        )
    num_classes = logits.shape[channel_dim]
    low, high = torch.stack(torch.aminmax(label)).tolist()  # one reduction, one device sync
    if low < 0 or high >= num_classes:  # a label value no class has: never clamped into one
        raise ValueError(
            f"label values must be class indices 0–{num_classes - 1}, got values from {low} to {high} "
            "(data.check_before_fit names the file)"
        )
    if logits.dtype != torch.float64:
        logits = logits.float()
    # contiguous: a channels-last network output would leave the class axis innermost, and the
    # per-class passes below are several times slower on that layout than one copy
    return logits.flatten(channel_dim + 1).contiguous(), label.reshape(batch, -1).long()


class _MarginalDiceCE(torch.autograd.Function):
    """Per-head marginal loss on logits `[B, H, C, N]`; returns `[H]`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        merge: Tensor,
        fg_index: Tensor,
        bg_index: Tensor,
        official: bool,
        smooth_dr: float,
    ) -> Tensor:
        batch, _, _, voxels = logits.shape
        num_groups = merge.shape[0]
        onehot = (target.unsqueeze(1) == torch.arange(num_groups, device=target.device)[:, None]).to(logits.dtype)
        if official:
            prob = torch.softmax(logits, dim=2)
        else:
            lse_all = torch.logsumexp(logits, dim=2, keepdim=True)
            prob = torch.exp(logits - lse_all)
        merged = torch.matmul(merge, prob)  # [B, H, M, N]: one pass sums every merged channel

        intersection = torch.einsum("bhmn,bmn->hm", merged, onehot)
        denominator = merged.sum((0, 3)) + onehot.sum((0, 2)) + smooth_dr
        dice = 1.0 - (2.0 * intersection / denominator).mean(1)

        count = batch * voxels
        if official:  # cross-entropy applied to the merged probabilities, as the reference does
            log_h = torch.log_softmax(merged, dim=2)
            ce = -torch.einsum("bhmn,bmn->h", log_h, onehot) / count
            aux = log_h
        else:  # -log p~_y, stable: log-sum-exp over the merged classes
            bg_logits = logits.index_select(2, bg_index)
            lse_bg = torch.logsumexp(bg_logits, dim=2, keepdim=True)
            log_fg = logits.index_select(2, fg_index) - lse_all
            log_merged = torch.cat((lse_bg - lse_all, log_fg), dim=2)
            ce = -torch.einsum("bhmn,bmn->h", log_merged, onehot) / count
            aux = torch.exp(bg_logits - lse_bg)  # p_c / p~_0 over the background classes

        ctx.save_for_backward(prob, merged, onehot, intersection, denominator, aux, fg_index, bg_index)
        ctx.official = official
        return dice + ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        prob, merged, onehot, intersection, denominator, aux, fg_index, bg_index = ctx.saved_tensors
        batch, heads, _, voxels = prob.shape
        num_groups = merged.shape[2]
        scale = grad_out.view(1, heads, 1, 1)

        # dL/dp~ per head h, merged channel m and voxel: with y the one-hot label, h~ = softmax(p~)
        # for the official CE (none otherwise) and s_h the output's scale, it is
        #   s_h h~_m / N + y_m s_h (-1/N [official] - 2/(M den_m)) + s_h 2 I_m / (M den_m^2)
        # built in one buffer with three passes (large temporaries cost page faults on CPU)
        count = batch * voxels
        dice_y = -2.0 / (num_groups * denominator)  # [H, M]
        constant = scale * (2.0 / num_groups) * (intersection / denominator**2).view(1, heads, num_groups, 1)
        if ctx.official:
            y_coef = scale * (dice_y - 1.0 / count).view(1, heads, num_groups, 1)
            grad_merged = torch.exp(aux)
            torch.addcmul(constant, grad_merged, scale / count, out=grad_merged)
        else:
            y_coef = scale * dice_y.view(1, heads, num_groups, 1)
            grad_merged = constant.expand_as(merged).clone()
        grad_merged.addcmul_(onehot.unsqueeze(1), y_coef)

        # softmax backward: every class of a merged channel shares that channel's gradient, so one
        # pass with the background channel's value, then the few foreground channels overwritten
        weighted = merged[:, :, 0] * grad_merged[:, :, 0]
        for m in range(1, num_groups):
            weighted.addcmul_(merged[:, :, m], grad_merged[:, :, m])
        shift = grad_merged.sub_(weighted.unsqueeze(2))
        if not ctx.official:  # d(-log p~_y)/dz_c = p_c - [c in group of y] p_c / p~_y
            ce_scale = scale / count
            shift.add_(ce_scale)
        grad_logits = prob * shift[:, :, :1].contiguous()  # a contiguous operand broadcasts faster
        grad_logits.index_copy_(2, fg_index, merged[:, :, 1:] * shift[:, :, 1:])
        if not ctx.official:
            onehot_h = onehot.unsqueeze(1)
            grad_logits.index_add_(2, bg_index, aux * (onehot_h[:, :, :1] * -ce_scale))
            grad_logits.index_add_(2, fg_index, onehot_h[:, :, 1:] * -ce_scale)
        return grad_logits, None, None, None, None, None, None


class MarginalDiceCELoss(nn.Module):
    """Supervised loss of a partially labelled site: classes it does not label merge into background.

    `ce="official"` feeds the merged probabilities to a cross-entropy that applies log-softmax
    again (the reference implementation's numbers); `ce="marginal"` is the textbook -log p~_y.
    """

    def __init__(self, foreground: Sequence[int], ce: str = "official", smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if ce not in CE_VARIANTS:
            raise ValueError(f"ce must be one of {CE_VARIANTS}, got '{ce}'")
        if not foreground or 0 in foreground or len(set(foreground)) != len(foreground):
            raise ValueError(f"foreground must be distinct class indices > 0, got {list(foreground)}")
        self.foreground = sorted(int(c) for c in foreground)
        self.ce = ce
        self.smooth_dr = smooth_dr

    def per_head(self, heads: Tensor, label: Tensor) -> Tensor:
        """Loss of each head of a deep-supervision stack `[B, H, C, *S]`, as a vector `[H]`."""
        logits, label = _flatten(heads, label, channel_dim=2)
        num_classes = logits.shape[2]
        if self.foreground[-1] >= num_classes:
            raise ValueError(f"foreground {self.foreground} does not fit logits with {num_classes} classes")
        device = logits.device
        group_of_class = torch.zeros(num_classes, dtype=torch.long, device=device)
        group_of_class[self.foreground] = torch.arange(1, len(self.foreground) + 1, device=device)
        fg_index = torch.tensor(self.foreground, device=device)
        bg_index = (group_of_class == 0).nonzero().flatten()
        merge = torch.nn.functional.one_hot(group_of_class, len(self.foreground) + 1).T.to(logits.dtype)
        target = group_of_class[label]
        with torch.autocast(device.type, enabled=False):  # sums over many voxels stay in float32
            return _MarginalDiceCE.apply(
                logits, target, merge, fg_index, bg_index, self.ce == "official", self.smooth_dr
            )

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        return self.per_head(logits.unsqueeze(1), label)[0]


class _ConDistDice(torch.autograd.Function):
    """Masked Dice between student and teacher conditional background probabilities."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        target: Tensor,
        is_fg: Tensor,
        membership: Tensor,
        class_slot: list[int],
        temperature: float,
        smooth_dr: float,
        foreground_filter: bool,
    ) -> Tensor:
        def conditional(logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            q = torch.softmax(logits * (1.0 / temperature), dim=1)
            sums = torch.matmul(membership, q)  # every group's sum and, last, the foreground's: one pass
            fg_sum = sums[:, -1:]
            denom = 1.0 - fg_sum + CONDIST_EPS
            return q, sums[:, :-1] / denom, fg_sum, denom

        q_s, r_s, fg_s, denom_s = conditional(student)
        _, r_t, _, _ = conditional(teacher)
        # torch.max gives the first maximal index like argmax, several times faster over dim 1 on CPU
        keep = ~(is_fg[teacher.max(1).indices] | is_fg[target]) if foreground_filter else ~is_fg[target]
        mask = keep.unsqueeze(1).to(r_s.dtype)
        r_t = r_t * mask
        intersection = torch.einsum("bgn,bgn->g", r_s, r_t)  # r_t carries the mask (mask^2 = mask)
        denominator = torch.einsum("bgn,bn->g", r_s, mask[:, 0]) + r_t.sum((0, 2)) + smooth_dr
        loss = 1.0 - (2.0 * intersection / denominator).mean()
        ctx.save_for_backward(q_s, r_s, r_t, mask, fg_s, denom_s, intersection, denominator)
        ctx.temperature, ctx.class_slot = temperature, class_slot
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q_s, r_s, r_t, mask, fg_s, denom_s, intersection, denominator = ctx.saved_tensors
        num_groups = r_s.shape[1]
        den = denominator.view(1, -1, 1)
        # d loss / d r_s,g on the masked voxels
        grad_r = (-2.0 / num_groups) * (r_t / den - mask * (intersection.view(1, -1, 1) / den**2)) * grad_out
        weighted = (grad_r * r_s).sum(1, keepdim=True)
        softmax_dot = weighted * (1.0 + fg_s / denom_s)  # sum_c q_c dL/dq_c
        # dL/dq_c - softmax_dot, per slot: each group, then "foreground", then "in no group"
        shift = torch.cat((grad_r / denom_s, weighted / denom_s, torch.zeros_like(weighted)), dim=1)
        shift = (shift - softmax_dot) * (1.0 / ctx.temperature)
        grad_student = torch.empty_like(q_s)
        for c, slot in enumerate(ctx.class_slot):  # one fused multiply per class, no [B, C, N] gather
            torch.mul(q_s[:, c], shift[:, slot], out=grad_student[:, c])
        return grad_student, None, None, None, None, None, None, None, None


class ConDistDiceLoss(nn.Module):
    """Conditional distillation on a site's unlabelled classes.

    Student and teacher probabilities are conditioned on "not a local foreground class" and summed
    over the `background` groups (each item a class index or a list of class indices); Dice compares
    them where neither the label nor the teacher's argmax is a local foreground class (without
    `foreground_filter`: wherever the label is background).
    """

    def __init__(
        self,
        num_classes: int,
        foreground: Sequence[int],
        background: Sequence[int | Sequence[int]],
        temperature: float = 2.0,
        smooth_dr: float = 1e-5,
        foreground_filter: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        groups = [[int(g)] if isinstance(g, int) else [int(c) for c in g] for g in background]
        members = [c for g in groups for c in g]
        overlap = set(members) & set(foreground)
        if len(set(members)) != len(members) or overlap or not groups:
            raise ValueError(
                f"background groups {groups} must be non-empty, disjoint and exclude foreground {list(foreground)}"
            )
        if max(members + list(foreground)) >= num_classes or min(members + list(foreground)) < 0:
            raise ValueError(f"class indices must lie in [0, {num_classes}), got {groups} and {list(foreground)}")
        self.num_classes = num_classes
        self.num_groups = len(groups)
        self.temperature = temperature
        self.smooth_dr = smooth_dr
        self.foreground_filter = foreground_filter
        is_fg = torch.zeros(num_classes, dtype=torch.bool)
        is_fg[list(foreground)] = True
        # slot of each class in the backward's per-slot gradient: its group, then "foreground", then "none"
        self.class_slot = [self.num_groups + 1] * num_classes
        for c in foreground:
            self.class_slot[c] = self.num_groups
        for g, members_g in enumerate(groups):
            for c in members_g:
                self.class_slot[c] = g
        membership = torch.zeros(self.num_groups + 1, num_classes)  # rows: each group, then the foreground
        for g, members_g in enumerate(groups):
            membership[g, members_g] = 1.0
        membership[self.num_groups, list(foreground)] = 1.0
        self.register_buffer("is_fg", is_fg, persistent=False)
        self.register_buffer("membership", membership, persistent=False)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, label: Tensor) -> Tensor:
        if teacher_logits.shape != student_logits.shape or student_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must "
                f"both be [B, {self.num_classes}, *spatial]"
            )
        student, target = _flatten(student_logits, label, channel_dim=1)
        teacher = teacher_logits.detach().to(student.dtype).flatten(2).contiguous()
        with torch.autocast(student.device.type, enabled=False):  # sums over many voxels stay in float32
            return _ConDistDice.apply(
                student,
                teacher,
                target,
                self.is_fg,
                self.membership.to(student.dtype),
                self.class_slot,
                self.temperature,
                self.smooth_dr,
                self.foreground_filter,
            )


class KDLoss(nn.Module):
    """Plain knowledge distillation: T² · KL(teacher ‖ student) between the tempered softmaxes of
    every class at every voxel, with no conditioning and no mask (the baseline ConDist refines)."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, label: Tensor) -> Tensor:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ"
            )
        with torch.autocast(student_logits.device.type, enabled=False):  # sums over many voxels in float32
            log_student = torch.log_softmax(student_logits.float() / self.temperature, dim=1)
            log_teacher = torch.log_softmax(teacher_logits.detach().float() / self.temperature, dim=1)
            kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1).mean()
            return kl * self.temperature**2


class PseudoLabelLoss(nn.Module):
    """Cross-entropy to the teacher's argmax on the voxels a site's label leaves open: where the
    label is background and the teacher, with softmax at least `threshold`, predicts a class the
    site does not label. A voxel the site labels (foreground, or background of its own classes) is
    never relabelled. The mean is over those voxels; 0 (with a gradient path) where there are none."""

    def __init__(self, num_classes: int, foreground: Sequence[int], threshold: float = 0.5) -> None:
        super().__init__()
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        is_local = torch.zeros(num_classes, dtype=torch.bool)
        is_local[list(foreground)] = True
        self.threshold = threshold
        self.register_buffer("is_local", is_local, persistent=False)

    def targets(self, teacher_logits: Tensor, label: Tensor) -> Tensor:
        """`[B, *S]` class indices: the teacher's class where it pseudo-labels, −1 elsewhere."""
        confidence, predicted = torch.softmax(teacher_logits.detach().float(), dim=1).max(1)
        open_voxel = (label[:, 0] == 0) & ~self.is_local[predicted] & (predicted != 0) & (confidence >= self.threshold)
        return torch.where(open_voxel, predicted, torch.full_like(predicted, -1))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, label: Tensor) -> Tensor:
        target = self.targets(teacher_logits, label)
        with torch.autocast(student_logits.device.type, enabled=False):
            per_voxel = nn.functional.cross_entropy(
                student_logits.float(), target.clamp(min=0), reduction="none"
            )  # [B, *S]
            chosen = (target >= 0).float()
            return (per_voxel * chosen).sum() / chosen.sum().clamp(min=1.0)
