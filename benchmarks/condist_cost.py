"""What ConDist costs, on the demo network and patch size (or any config's).

Prints two ratios (median of timed repeats, after warm-up):
  1. a ConDist training step (student forward/backward + frozen-teacher forward + both losses +
     optimizer step) divided by a supervised-only step (marginal loss alone)   target ≤ 1.5
  2. forward+backward of lightning_fl.losses divided by a straightforward per-channel
     implementation of the same formulas with MONAI's Dice (tests/helpers/reference_losses.py)  goal ≤ 0.5
and what each step achieves: its FLOPs (counted by torch.utils.flop_counter) per second, against
the peak of this device at the same precision and threads, measured as a large matrix product.
2D and 3D alike: the network and patch are the config's (`model=dynunet_2d` for slices).
`--compile` adds the ConDist step under `torch.compile` against eager: step time, compile time
and whether the losses agree.

    python benchmarks/condist_cost.py [--config configs/condistfl_synthetic.yaml] [--repeats 20] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.helpers.reference_losses

from _timing import median_times, record  # noqa: E402

from lightning_fl.build import build_run  # noqa: E402
from lightning_fl.config import load_config  # noqa: E402
from lightning_fl.distributed import device_name, resolve_precision  # noqa: E402
from lightning_fl.labels import LabelSpace  # noqa: E402
from lightning_fl.losses import ConDistDiceLoss, MarginalDiceCELoss, deep_supervision_weights  # noqa: E402
from lightning_fl.networks import memory_format  # noqa: E402
from tests.helpers.reference_losses import condist_loss_loop, marginal_loss_loop  # noqa: E402


def step_timer(
    cfg, fabric: L.Fabric, condist: bool, batch: dict[str, torch.Tensor], compiled: bool = False
) -> Callable[[], float]:
    """One optimizer step of a real objective (the config's first site's) on Fabric, as the round
    loop runs it; returns the step's loss. The network's weights are seeded (seed 0), so two timers
    start from the same model; `compiled`: student and teacher through `torch.compile`."""
    cfg = cfg.copy()
    cfg.method.condist = condist
    run = build_run(cfg)
    torch.manual_seed(0)
    objective = run.objective([run.labels.foreground(cfg.data.sites[0].classes)], run.new_network())
    if compiled:
        objective.student, objective.teacher = torch.compile(objective.student), torch.compile(objective.teacher)
    module, optimizer = fabric.setup(objective, objective.configure_optimizers()["optimizer"])
    module.train()

    def step() -> float:
        with fabric.autocast():
            loss = module.training_step(batch, 0)
        fabric.backward(loss)
        fabric.clip_gradients(module, optimizer, max_norm=cfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compile_check(cfg, fabric: L.Fabric, batch: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    """`torch.compile` against eager on the ConDist step: the compiled first step (compilation
    included), the median step after it, and how far the two agree over the first steps from the
    same weights and batch (worth it only where faster at equal numbers, the compile time paid back)."""
    eager, compiled = step_timer(cfg, fabric, True, batch), step_timer(cfg, fabric, True, batch, compiled=True)
    start = time.perf_counter()
    losses = [(compiled(), eager())]
    first = time.perf_counter() - start
    losses += [(compiled(), eager()) for _ in range(4)]
    eager_time, compiled_time = median_times([eager, compiled], repeats, warmup=1)
    gap = max(abs(c - e) / abs(e) for c, e in losses)
    print(f"\n{'torch.compile, ConDist step':<52}{'ms':>10}")
    print(f"{'eager':<52}{eager_time * 1e3:>10.1f}")
    print(f"{'compiled':<52}{compiled_time * 1e3:>10.1f}")
    print(f"{'first compiled step (compiling included), s':<52}{first:>10.1f}")
    print(f"compiled / eager = {compiled_time / eager_time:.2f}; largest relative loss gap over 5 steps {gap:.1e}")
    saved = eager_time - compiled_time
    if saved > 0:
        print(f"compilation paid back after {first / saved:.0f} steps")
    return compiled_time / eager_time, first


def step_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one call of `step` (convolutions and matrix products, as
    PyTorch's FLOP counter counts them; 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak(fabric: L.Fabric, size: int = 4096) -> float:
    """FLOP/s of a `size`² matrix product under the run's autocast: what this device reaches at
    best with these threads and this precision, the yardstick for the steps."""
    a, b = (torch.randn(size, size, device=fabric.device) for _ in range(2))

    def product() -> None:
        with fabric.autocast():
            a @ b

    (seconds,) = median_times([product], repeats=5, warmup=2)
    return 2 * size**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "condistfl_synthetic.yaml")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time the ConDist step under torch.compile")
    parser.add_argument("--record", action="store_true", help="record the figures in benchmarks/README.md's table")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.patch_size=[16,16,16]")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    cfg.fabric.precision = resolve_precision(cfg.fabric)
    fabric = L.Fabric(accelerator=cfg.fabric.accelerator, devices=1, precision=cfg.fabric.precision)
    labels = LabelSpace.of(cfg.labels)
    site = cfg.data.sites[0]
    foreground = labels.foreground(site.classes)
    groups = labels.background_groups(foreground)
    batch_size = cfg.data.batch_size * cfg.data.samples_per_volume
    heads = 1 + cfg.model.deep_supervision_heads
    spatial = tuple(cfg.data.patch_size)
    print(
        f"config {args.config.name}: site '{site.name}' {foreground}, batch {batch_size}, patch {list(spatial)}, "
        f"{heads} heads, {labels.num_classes} classes, device {fabric.device} "
        f"({torch.cuda.get_device_name() if fabric.device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"precision {cfg.fabric.precision}"
    )

    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 1, *spatial, generator=g).to(fabric.device, memory_format=memory_format(cfg.model))
    label = torch.tensor([0] + foreground)[torch.randint(len(foreground) + 1, (batch_size, 1, *spatial), generator=g)]
    batch = {"image": image, "label": label.to(fabric.device)}
    timers = (step_timer(cfg, fabric, True, batch), step_timer(cfg, fabric, False, batch))
    condist_step, supervised_step = median_times(timers, args.repeats, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if fabric.device.type == "cuda" else None
    condist_flops, supervised_flops = (step_flops(t) for t in timers)
    device_peak = matmul_peak(fabric)

    logits = torch.randn(batch_size, heads, labels.num_classes, *spatial, generator=g).to(fabric.device)
    teacher = torch.randn(batch_size, labels.num_classes, *spatial, generator=g).to(fabric.device)
    label = label.to(fabric.device)
    weights = deep_supervision_weights(heads).to(fabric.device)
    marginal = MarginalDiceCELoss(foreground, ce=cfg.method.ce)
    condist = ConDistDiceLoss(labels.num_classes, foreground, groups, cfg.method.temperature).to(fabric.device)

    def fast() -> None:
        x = logits.detach().requires_grad_(True)
        ((weights * marginal.per_head(x, label)).sum() + condist(x[:, 0], teacher, label)).backward()

    def loop() -> None:
        x = logits.detach().requires_grad_(True)
        supervised = sum(
            weights[h] * marginal_loss_loop(x[:, h], label, foreground, cfg.method.ce) for h in range(heads)
        )
        (supervised + condist_loss_loop(x[:, 0], teacher, label, foreground, groups, cfg.method.temperature)).backward()

    fast_time, loop_time = median_times([fast, loop], args.repeats, warmup=3)

    print(f"\n{'measurement':<52}{'ms':>10}")
    print(f"{'training step, ConDist (marginal + ConDist)':<52}{condist_step * 1e3:>10.1f}")
    print(f"{'training step, supervised only (marginal)':<52}{supervised_step * 1e3:>10.1f}")
    print(f"{'losses fwd+bwd, lightning_fl.losses':<52}{fast_time * 1e3:>10.1f}")
    print(f"{'losses fwd+bwd, per-channel MONAI reference':<52}{loop_time * 1e3:>10.1f}")
    if peak is not None:
        print(f"{'peak GPU memory of the training steps (GiB)':<52}{peak:>10.1f}")
    print(f"\n{'step':<12}{'GFLOP':>10}{'GFLOP/s':>10}{'of peak':>10}")
    for name, flops, seconds in (
        ("ConDist", condist_flops, condist_step),
        ("supervised", supervised_flops, supervised_step),
    ):
        rate = flops / seconds
        print(f"{name:<12}{flops / 1e9:>10.1f}{rate / 1e9:>10.1f}{rate / device_peak:>10.1%}")
    print(f"peak: {device_peak / 1e9:.0f} GFLOP/s ({cfg.fabric.precision} 4096² matrix product)")
    print(f"\nConDist step / supervised step = {condist_step / supervised_step:.2f}   (target ≤ 1.5)")
    print(f"fast losses / per-channel losses = {fast_time / loop_time:.2f}   (goal ≤ 0.5)")
    compiled = compile_check(cfg, fabric, batch, args.repeats) if args.compile else None
    if args.record:
        levels, rate = len(cfg.model.filters), condist_flops / condist_step
        row = {
            "network": f"{len(spatial)}D, {cfg.model.filters[0]} base filters, {levels} levels",
            "batch": f"{batch_size} × {'×'.join(map(str, spatial))}",
            "device": device_name(fabric.device),
            "threads": str(torch.get_num_threads()) if fabric.device.type == "cpu" else "",
            "precision": cfg.fabric.precision,
            "ConDist step (ms)": f"{condist_step * 1e3:.1f}",
            "supervised step (ms)": f"{supervised_step * 1e3:.1f}",
            "ratio (target ≤ 1.5)": f"{condist_step / supervised_step:.2f}",
            "ConDist GFLOP/s (of peak)": f"{rate / 1e9:.1f} ({rate / device_peak:.0%})",
            "peak GFLOP/s": f"{device_peak / 1e9:.0f}",
            "compiled / eager (compile s)": "not measured"
            if compiled is None
            else f"{compiled[0]:.2f} ({compiled[1]:.0f})",
        }
        record("step_cost", row, key=("network", "batch", "device", "threads", "precision"))


if __name__ == "__main__":
    main()
