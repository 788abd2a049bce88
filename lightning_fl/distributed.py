"""Processes and placement: which rank trains which site, and how results cross ranks.

Lightning Fabric launches the processes (from the CLI, `torchrun` or SLURM) and sets up
torch.distributed; this module decides the work of each rank:

- site-parallel (ranks ≤ sites): every site belongs to one rank; ranks train their sites one after
  the other, then each site's update is broadcast from its rank, so every rank holds every update
  and computes the same aggregate, in the same order, as one process does;
- data-parallel (ranks > sites): every site gets a block of ranks that trains it with DDP over its
  own process subgroup (gradients averaged in the subgroup, each batch split across it).

Randomness belongs to sites: a site's data order, augmentation and dropout in a round come from
`site_seed(run seed, site, round)`, so moving a site to another rank changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.strategies import DDPStrategy
from omegaconf import DictConfig
from torch import nn

from lightning_fl.aggregation import StateDict
from lightning_fl.config import ConfigError
from lightning_fl.loggers import StepMeans

START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn"}
T = TypeVar("T")


def site_seed(seed: int, site: str, round: int) -> int:
    """A 63-bit seed from (run seed, site name, round) alone: stable across processes and Pythons.
    The round is hashed counted from 0, as rounds were first numbered, so runs reproduce earlier ones."""
    digest = hashlib.sha256(f"{seed}/{site}/{round - 1}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def place_sites(names: Sequence[str], costs: Sequence[float], world_size: int) -> dict[str, list[int]]:
    """The ranks of each site, deterministically.

    Ranks ≤ sites: longest-cost-first onto the least-loaded rank (ties: the lower rank), one rank
    per site. Ranks > sites: every site gets a contiguous block of ranks, the spare ranks going one by
    one to the site with the highest cost per rank.
    """
    if world_size <= len(names):
        load = [0.0] * world_size
        placement: dict[str, list[int]] = {}
        for i in sorted(range(len(names)), key=lambda i: (-costs[i], i)):
            rank = min(range(world_size), key=lambda r: (load[r], r))
            load[rank] += costs[i]
            placement[names[i]] = [rank]
        return {name: placement[name] for name in names}
    counts = [1] * len(names)
    for _ in range(world_size - len(names)):
        busiest = max(range(len(names)), key=lambda i: (costs[i] / counts[i], -i))
        counts[busiest] += 1
    starts = [sum(counts[:i]) for i in range(len(names))]
    return {name: list(range(start, start + count)) for name, start, count in zip(names, starts, counts)}


def resolve_precision(fabric_cfg: DictConfig) -> str:
    """`auto`: bf16 autocast where the hardware computes in bf16 (recent GPUs, CPUs with
    AVX512-BF16 or AMX), full float32 elsewhere. `16-mixed` off a GPU is `auto`'s choice for the
    CPU: Lightning would silently run bf16 there while the run recorded float16. Any other explicit
    Fabric precision is kept."""
    on_gpu = fabric_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if fabric_cfg.precision != "auto" and not (fabric_cfg.precision == "16-mixed" and not on_gpu):
        return fabric_cfg.precision
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return (
        "bf16-mixed"
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else "32-true"
    )


@dataclass
class Placement:
    """This rank's view of the placement: each site's ranks and, for data-parallel sites, its group."""

    rank: int
    ranks: dict[str, list[int]]
    groups: dict[str, Any]  # site -> torch.distributed process group, only for sites with > 1 rank

    def owner(self, site: str) -> int:
        """The rank that sends the site's update and evaluates it (the first of its block)."""
        return self.ranks[site][0]

    def trains(self, site: str) -> bool:
        """Whether this rank takes part in training the site."""
        return self.rank in self.ranks[site]

    def shard(self, site: str) -> tuple[int, int]:
        """(position of this rank in the site's block, block size): which share of a batch it takes."""
        block = self.ranks[site]
        return block.index(self.rank), len(block)


def make_placement(fabric: L.Fabric, names: Sequence[str], costs: Sequence[float]) -> Placement:
    """Place the clients on the ranks by cost (`place_sites`) and create the process group of each
    client trained by several ranks."""
    ranks = place_sites(names, costs, fabric.world_size)
    groups = {}
    for name in names:  # every rank creates every subgroup, in the same order (torch.distributed's rule)
        if len(ranks[name]) > 1:
            group = dist.new_group(ranks[name])
            if fabric.global_rank in ranks[name]:
                groups[name] = group
    return Placement(fabric.global_rank, ranks, groups)


class FederatedDDPStrategy(DDPStrategy):
    """Fabric's DDP for launching and torch.distributed, without wrapping modules in DDP: ranks train
    different sites, so a whole-world DDP would mix their gradients. A site that several ranks share
    wraps its own student in DDP over its subgroup (`Site.data_parallel`)."""

    def setup_module(self, module: nn.Module) -> nn.Module:
        return module


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator on a machine where PyTorch sees no CUDA GPU, with a clear `ConfigError`."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"fabric.accelerator={accelerator}, but PyTorch sees no CUDA GPU here; use fabric.accelerator=cpu (or auto)"
        )


def resolve_devices(fabric_cfg: DictConfig, clients: int) -> int:
    """`auto`: every GPU where there are GPUs; on a CPU one process per client up to the cores, since
    a small network's step barely gains from a second thread but clients train independently. One
    pooled client (centralized) gets one process and every core: data-parallel over two one-thread
    processes, its round took 26 s against 18 s (2D testbed network, 2-core AMD EPYC, bf16)."""
    if fabric_cfg.devices != "auto":
        return int(fabric_cfg.devices)
    if fabric_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(clients, cores))


def build_fabric(cfg: DictConfig) -> L.Fabric:
    """Fabric as the `fabric` config group asks (`precision` and `devices: auto` resolved in the
    config, so the saved config says what ran); its logger averages the sites' step metrics."""
    settings = cfg.fabric
    check_accelerator(settings.accelerator)
    asked, settings.precision = settings.precision, resolve_precision(settings)
    if asked not in ("auto", settings.precision):
        print(f"fabric.precision={asked} needs a GPU; running (and recording) {settings.precision}")
    clients = 1 if cfg.method.training == "centralized" else len(cfg.data.sites)
    settings.devices = resolve_devices(settings, clients)
    strategy: Any = "auto"
    if settings.devices * settings.num_nodes > 1:  # config.py allows "auto", "ddp", "ddp_spawn"
        strategy = FederatedDDPStrategy(start_method=START_METHODS.get(settings.strategy, "popen"))
    return L.Fabric(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision=settings.precision,
        loggers=[StepMeans()],
    )


def broadcast_states(
    states: dict[str, StateDict | None], owners: dict[str, int], template: StateDict
) -> dict[str, StateDict]:
    """Every site's state dict on every rank: each is sent from its owner (a rank that does not own
    a site receives into buffers shaped like `template`). With one process: the input itself."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: state for name, state in states.items() if state is not None}
    rank = dist.get_rank()
    received, pending = {}, []
    for name, owner in owners.items():
        state = states[name] if rank == owner else {k: torch.empty_like(v) for k, v in template.items()}
        assert state is not None, f"rank {rank} owns site '{name}' but has no update for it"
        pending += [dist.broadcast(state[key], src=owner, async_op=True) for key in template]
        received[name] = state
    for work in pending:
        work.wait()
    return received


class RankFailedError(RuntimeError):
    """Another rank failed: this one stops too, rather than wait for it in the next collective."""


def checked_on_every_rank(fabric: L.Fabric, what: str, work: Callable[[], T]) -> T:
    """Run this rank's own part of a step (training its sites, scoring, writing files), then tell
    every rank whether it failed anywhere: the failing rank re-raises its error, the others raise
    `RankFailedError` naming it. Work inside must not wait for other ranks, except the ranks of a
    data-parallel site for each other (they all do the same work)."""
    if fabric.world_size == 1:
        return work()
    error: Exception | None = None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error = err
    status = f"rank {fabric.global_rank} failed while {what}: {_describe(error)}" if error else None
    statuses: list[str | None] = [None] * fabric.world_size
    dist.all_gather_object(statuses, status)
    if error is not None:
        raise error
    failures = [s for s in statuses if s]
    if failures:
        raise RankFailedError("; ".join(failures))
    return result


def _describe(error: BaseException) -> str:
    """The error and, where a library wrapped it (MONAI's transforms do), its root cause."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = f"{type(error).__name__}: {error}"
    return text if root is error else f"{text}, caused by {type(root).__name__}: {root}"


def merge_from_ranks(fabric: L.Fabric, mine: dict[str, Any], only_to: int | None = None) -> dict[str, Any]:
    """The union of every rank's dict (picklable values), in rank order, on every rank, or on rank
    `only_to` alone (the others get {}): large values need not travel to every rank."""
    if fabric.world_size == 1:
        return mine
    everyone: list[dict[str, Any]] = [{} for _ in range(fabric.world_size)]
    if only_to is None:
        dist.all_gather_object(everyone, mine)
    else:
        dist.gather_object(mine, everyone if fabric.global_rank == only_to else None, dst=only_to)
    return {key: value for part in everyone for key, value in part.items()}


def leave_process_group(fabric: L.Fabric) -> None:
    """End a multi-process run together: process groups (subgroups included) torn down at
    interpreter exit, while another rank still uses them, can abort the process."""
    if dist.is_available() and dist.is_initialized():
        fabric.barrier()
        dist.destroy_process_group()


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory (Linux reports kilobytes) and, on a GPU, the peak
    memory PyTorch allocated there."""
    peaks = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peaks["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peaks


def device_name(device: torch.device) -> str:
    """What the run computed on, for its summary: the GPU's name, or the CPU's model and cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.is_file()
        else []
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # kernels limited to an older instruction set (how an AVX2-only CPU is measured on a newer one)
    capped = os.environ.get("ATEN_CPU_CAPABILITY") or os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{names[0] if names else platform.processor() or 'CPU'}, {cores} cores" + (
        f", kernels capped at {capped.lower()}" if capped else ""
    )


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Park a site's optimizer state on the host between its turns, or bring it back to the device."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                state[key] = value.to(device, non_blocking=True)
