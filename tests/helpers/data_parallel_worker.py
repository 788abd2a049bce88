"""Run by tests/test_distributed.py as `python data_parallel_worker.py DATA_ROOT OUT_DIR`: one site
trained by two gloo ranks (data-parallel mode). Fabric re-runs this script for rank 1.

Each rank computes the gradient of its half of one batch twice: under DDP's `no_sync` (its own
gradient alone) and normally (DDP averages over the site's subgroup). Rank 0 writes how far the
synced gradient is from the mean of the two local ones, then the ranks run a 1-round federation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_fl.config import CONFIG_DIR, load_config
from lightning_fl.distributed import build_fabric, leave_process_group, site_seed
from lightning_fl.federation import Federation


def gradients(federation: Federation, batch: dict, sync: bool) -> list[torch.Tensor]:
    local = federation.clients["liver"]
    student = local.objective.student  # the DDP wrapper
    local.optimizer.zero_grad(set_to_none=True)
    context = student.no_sync() if not sync else torch.enable_grad()
    with context:
        federation.fabric.backward(local.module.training_step(batch, 0))
    return [p.grad.detach().clone() for p in local.objective.network.parameters()]


def one_site_config(root: str, out: str):
    return load_config(
        CONFIG_DIR / "smoke.yaml",
        [
            "data.synthetic=null",
            f"data.root={root}",
            "data.external=[]",
            f"output_dir={out}",
            "data.sites=[{name: liver, datalist: liver.json, classes: [liver, liver_tumor]}]",
            "data.samples_per_volume=2",
            "fl.rounds=1",
            "logger.wandb.mode=disabled",
            "fabric.accelerator=cpu",
            "fabric.devices=2",
            "fabric.strategy=ddp",
            "fabric.precision=32-true",
        ],
    )


def main(fabric, cfg) -> None:
    federation = Federation(cfg, fabric)
    local = federation.clients["liver"]
    local.objective.receive(federation.server.models["global"], 1)
    batch = next(local.sources[0][1].start_round(site_seed(cfg.seed, "liver", 1), 1, local.shard))
    batch = {key: value.as_tensor() for key, value in batch.items()}
    own = gradients(federation, batch, sync=False)
    synced = gradients(federation, batch, sync=True)
    gathered = [[torch.empty_like(g) for _ in range(2)] for g in own]
    for g, slots in zip(own, gathered):
        dist.all_gather(slots, g)
    report = {
        "shard": list(local.shard),
        "patches": int(batch["image"].shape[0]),
        "synced_vs_mean": max((s - (a + b) / 2).abs().max().item() for s, (a, b) in zip(synced, gathered)),
        "rank0_vs_rank1": max((a - b).abs().max().item() for a, b in gathered),
        "grad_scale": max(s.abs().max().item() for s in synced),
        "teacher_wrapped": isinstance(local.objective.teacher, torch.nn.parallel.DistributedDataParallel),
    }
    reports = [None, None]
    dist.all_gather_object(reports, report)
    summary = federation.fit()
    if fabric.global_rank == 0:
        (Path(cfg.output_dir) / "data_parallel.json").write_text(json.dumps({"ranks": reports, "summary": summary}))
    leave_process_group(fabric)


if __name__ == "__main__":
    cfg = one_site_config(*sys.argv[1:3])
    build_fabric(cfg).launch(main, cfg)
