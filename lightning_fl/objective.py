"""What a client optimises, as a LightningModule: the student it trains, the frozen teacher it distils from.

The teacher is the global model the client received at the start of the round: eval mode, no
gradients, outside the optimizer, and never part of what the client returns. Optimizer and
scheduler belong to the client and persist across rounds, as in the reference ConDistFL protocol;
loading new global weights copies into the same parameter tensors, so the momentum buffers and the
cosine schedule carry on. The student's weights need not persist (every round starts from the
global model), so the clients of one process share one student network and one teacher, and each
keeps only its optimizer and schedule. The losses and the ConDist weight schedule are explained in
`docs/explanation/method.md`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_fl.aggregation import StateDict
from lightning_fl.labels import LabelSpace
from lightning_fl.losses import ConDistDiceLoss, KDLoss, MarginalDiceCELoss, PseudoLabelLoss, deep_supervision_weights


def condist_weight(method: DictConfig, round: int, rounds: int) -> float:
    """The teacher term's w_r: 0 before `condist_start_round`, then rising linearly from
    `condist_weight_start` (at that round) to `condist_weight_end` (round `rounds`)."""
    start = method.condist_start_round
    if round < start:
        return 0.0
    if rounds == start:
        return method.condist_weight_start
    step = (method.condist_weight_end - method.condist_weight_start) / (rounds - start)
    return method.condist_weight_start + (round - start) * step


def teacher_term(cfg: DictConfig, labels: LabelSpace, foreground: list[int]) -> tuple[str, nn.Module] | None:
    """The method's loss on the teacher's output for a site labelling `foreground`, and its name
    (ConDist, KD or pseudo-labels); None for the baselines without one."""
    method = cfg.method
    if method.condist:
        groups = labels.background_groups(foreground, method.background_groups)
        condist = ConDistDiceLoss(
            labels.num_classes, foreground, groups, method.temperature, foreground_filter=method.foreground_filter
        )
        return "condist", condist
    if method.kd:
        return "kd", KDLoss(method.temperature)
    if method.pseudo_label:
        return "pseudo_label", PseudoLabelLoss(labels.num_classes, foreground, method.pseudo_label_threshold)
    return None


def freeze(module: nn.Module) -> nn.Module:
    """Put `module` in eval mode without gradients (the teacher, the scoring network); returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


class Objective(L.LightningModule):
    """A client's training objective: its losses around a student network and the frozen global model as teacher.

    It exists to keep what one local training step computes in a LightningModule: the marginal
    Dice+CE loss on each source's labelled classes, the method's teacher term (ConDist on the
    others, or KD, or pseudo-labels; weighted by the round's w_r), the FedProx term where asked, and the SGD optimizer
    with its cosine schedule. It holds the student and teacher networks, those losses, the method
    and optim settings, and the current round.

    `tasks` holds the foreground classes of each data source the client trains on: one for a
    site's client, every site's for the pooled client of centralized training, where a batch's
    `source` says whose labels it carries and so which marginal loss supervises it."""

    def __init__(
        self,
        tasks: list[list[int]],
        labels: LabelSpace,
        student: nn.Module,
        teacher: nn.Module,
        cfg: DictConfig,
        steps_per_round: int,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher)
        self.method, self.optim, self.rounds = cfg.method, cfg.optim, cfg.fl.rounds
        self.steps_per_round = steps_per_round
        self.total_steps = cfg.fl.rounds * steps_per_round
        self.supervised_losses = nn.ModuleList(MarginalDiceCELoss(task, ce=cfg.method.ce) for task in tasks)
        term = teacher_term(cfg, labels, tasks[0])
        self.teacher_term_name, self.teacher_loss = term if term is not None else ("", None)
        self.register_buffer(
            "head_weights", deep_supervision_weights(1 + cfg.model.deep_supervision_heads), persistent=False
        )
        self.round = 1

    def train(self, mode: bool = True) -> Objective:
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode whatever the objective's mode
        return self

    @property
    def network(self) -> nn.Module:
        """The student's network, unwrapped from DDP where the site is data-parallel."""
        return self.student.module if isinstance(self.student, DistributedDataParallel) else self.student

    def data_parallel(self, group: Any, device_ids: list[int] | None) -> None:
        """Train with the ranks of `group`: DDP over that subgroup averages the student's gradients.
        The teacher stays outside DDP (it has no gradients and the same weights on every rank)."""
        self.student = DistributedDataParallel(self.student, device_ids=device_ids, process_group=group)

    def receive(self, global_state: StateDict, round: int) -> None:
        """Start round `round` (numbered from 1): student and teacher both become the global model."""
        with torch.no_grad():
            self.network.load_state_dict(global_state)
            self.teacher.load_state_dict(global_state)
        self.round = round

    def update(self, global_state: StateDict) -> StateDict:
        """Δ_k = student − global for floating-point entries; integer buffers are sent as they are."""
        local = self.network.state_dict()
        return {
            key: (value.detach() - global_state[key].to(value.device)) if value.is_floating_point() else value.clone()
            for key, value in local.items()
        }

    def forward(self, image: Tensor) -> Tensor:
        """The student's output heads for `image`."""
        return self.student(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The loss of one batch (supervised, plus the teacher and proximal terms where enabled); logs its parts."""
        image, label = batch["image"], batch["label"]
        heads = self.student(image)
        if heads.dim() == image.dim():  # no deep supervision: a single head
            heads = heads.unsqueeze(1)
        marginal = self.supervised_losses[batch.get("source", 0)]
        supervised = (self.head_weights * marginal.per_head(heads, label)).sum()
        metrics = {"supervised": supervised.detach()}
        loss = supervised
        weight = condist_weight(self.method, self.round, self.rounds)
        if self.teacher_loss is not None and weight > 0:  # before the start round: no teacher pass
            with torch.no_grad():
                teacher_logits = self.teacher(image)
            term = self.teacher_loss(heads[:, 0], teacher_logits, label)
            loss = loss + weight * term
            metrics |= {self.teacher_term_name: term.detach(), "condist_weight": weight}
        if self.method.proximal_mu > 0:  # FedProx: the teacher holds the global weights w_global
            proximal = sum(((w - g) ** 2).sum() for w, g in zip(self.network.parameters(), self.teacher.parameters()))
            loss = loss + 0.5 * self.method.proximal_mu * proximal
            metrics["proximal"] = proximal.detach()
        metrics |= {"loss": loss.detach(), "lr": self.optimizers().param_groups[0]["lr"]}
        self.log_dict(metrics)
        return loss

    def configure_optimizers(self) -> Any:
        """SGD with a cosine schedule over every local step of the whole run (after a linear warm-up
        over the first `optim.warmup_rounds` rounds), stepped per iteration (not reset when new global
        weights arrive)."""
        optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=self.optim.lr,
            momentum=self.optim.momentum,
            nesterov=self.optim.nesterov,
            weight_decay=self.optim.weight_decay,
        )
        warmup = self.optim.warmup_rounds * self.steps_per_round
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.total_steps - warmup, eta_min=self.optim.eta_min
        )
        scheduler: torch.optim.lr_scheduler.LRScheduler = cosine
        if warmup:
            # step i < warmup at lr (i + 1) / (warmup + 1), the cosine's first step at lr
            linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
