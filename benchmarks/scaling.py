"""How the round loop scales over processes on CPU (gloo), with real `lightning-fl fit` runs.

Prints
  1. the round time of the demo federation (4 sites) with 1 and 2 processes, one thread each,
     and the speed-up                                                          target ≥ 1.7
  2. the peak host memory per process with 4, 2 and 1 sites per rank (1, 2 and 4 processes) on
     the paper's network, next to what a full model + optimizer weighs: an extra site on a rank
     must cost less than that (its sites share one student and one teacher; each keeps only its
     optimizer state)

    python benchmarks/scaling.py [--rounds 2] [--local-steps N] [--skip-time] [--skip-memory]

Run times come from each run's summary.json (`round_time_s`, the rounds after the first), memory
from its `peak_host_memory_mb` (the largest process). Synthetic data goes to $LIGHTNING_FL_DATA
(or the user cache) as for any run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUIET = ["logger.wandb.mode=disabled", "logger.progress=false", "fabric.accelerator=cpu", "fabric.strategy=ddp"]
# the paper's 6-level DynUNet on patches its strides accept, on the small smoke federation
PAPER_NET = """
defaults: [smoke, model/dynunet_paper]
data: {patch_size: [64, 64, 32]}
eval: {roi_size: [64, 64, 32]}
optim: {lr: 0.01, momentum: 0.99}
fabric: {precision: 32-true}  # PyTorch's bf16 CPU convolution returns garbage weight gradients at 2³ voxels
"""


def fit(config: Path, out: Path, devices: int, *overrides: str) -> dict:
    """One run in a fresh process tree, one thread per process; returns its summary."""
    args = [
        sys.executable,
        "-m",
        "lightning_fl",
        "fit",
        "--config",
        str(config),
        f"output_dir={out}",
        f"fabric.devices={devices}",
        *QUIET,
        *overrides,
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"run failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def round_time(summary: dict) -> float:
    times = summary["round_time_s"]
    return statistics.mean(times[1:] if len(times) > 1 else times)


def model_megabytes(config: Path) -> float:
    from lightning_fl.build import build_run
    from lightning_fl.config import load_config

    net = build_run(load_config(config)).network
    return sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    demo = REPO / "configs" / "condistfl_synthetic.yaml"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_time:
            steps = [f"fl.rounds={args.rounds}"] + ([f"fl.local_steps={args.local_steps}"] if args.local_steps else [])
            times = {n: round_time(fit(demo, tmp / f"time{n}", n, *steps)) for n in (1, 2)}
            steps_label = args.local_steps or "the demo's"
            print(f"round time, demo federation (4 sites, {steps_label} local steps), 1 thread per process")
            for n, t in times.items():
                print(f"  {n} process{'es' if n > 1 else '  '}  {t:7.2f} s")
            print(f"speed-up with 2 processes = {times[1] / times[2]:.2f}   (target ≥ 1.7)")
        if args.skip_memory:
            return

        paper = tmp / "paper_net.yaml"
        paper.write_text(PAPER_NET)
        weights = model_megabytes(paper)
        print(
            f"\npeak host memory per process, paper network ({weights:.0f} MB of weights; "
            f"model + SGD momentum = {2 * weights:.0f} MB)"
        )
        peaks = {}
        for devices in (4, 2, 1):
            summary = fit(paper, tmp / f"memory{devices}", devices, "fl.rounds=1", "fl.local_steps=2")
            peaks[4 // devices] = max(summary["peak_host_memory_mb"])
            sites, processes = f"site{'s' if devices < 4 else ''}", f"process{'es' if devices > 1 else ''}"
            label = f"{4 // devices} {sites} per rank ({devices} {processes})"
            print(f"  {label:<32} {peaks[4 // devices]:7.0f} MB")
        growth = (peaks[4] - peaks[1]) / 3
        print(
            f"growth per extra site on a rank = {growth:.0f} MB   (must stay below a full model + optimizer, "
            f"{2 * weights:.0f} MB)"
        )


if __name__ == "__main__":
    main()
