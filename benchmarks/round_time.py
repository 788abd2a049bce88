"""Where one round's time goes, on the demo config (or any config), in one process.

Runs `fit` for a few rounds with timers around each phase of the loop and prints the last round
split into
  - local steps: the sites' optimizer steps (forward and losses, backward, clipping, the SGD
    step), of which the frozen teacher's forwards are shown apart;
  - data: drawing the steps' patch batches from the cached volumes (crops, augmentation);
  - loop overhead: the rest of local training (receiving the global model, moving optimizer
    state, finiteness checks, metrics, computing Δ), as a share of the local steps: goal ≤ 3 %;
  - aggregation, validation, checkpoint (state.ckpt, best.ckpt, last.ckpt) and logging
    (metrics.csv, W&B).
All parts are timed in the same run, so a shared machine's slow spells do not fall between them.

    python benchmarks/round_time.py [--config FILE] [--rounds 2] [key=value ...]

One process, whatever the config's `fabric.devices`: each of the demo's two processes on two cores
runs this same loop for half the sites. Synthetic data goes to $LIGHTNING_FL_DATA (or the user
cache) as for any run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_fl import run_folder
from lightning_fl.config import load_config
from lightning_fl.distributed import build_fabric
from lightning_fl.federation import Federation
from lightning_fl.objective import Objective

REPO = Path(__file__).resolve().parent.parent
QUIET = ["logger.progress=false", "fabric.devices=1", "data.check_before_fit=false"]


class PhaseTimes:
    """Seconds per (round, phase), accumulated by wrapped functions."""

    def __init__(self) -> None:
        self.round = 0
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[(self.round, phase)] += time.perf_counter() - start

        return timed


def instrument(federation: Federation, times: PhaseTimes) -> None:
    """Timers around the loop's phases, the parts of an optimizer step, the teacher's forward
    inside a step, and batch drawing."""
    f = federation
    train_clients = f.train_clients

    def counted_round(round: int) -> Any:
        times.round = round
        return times.wrap("local training", train_clients)(round)

    f.train_clients = counted_round
    f.server.aggregate = times.wrap("aggregation", f.server.aggregate)
    score = f.score
    f.score = lambda states, pairs, split, *rest: times.wrap(split, score)(
        states, pairs, split, *rest
    )  # validation, or testing
    f.server._save_state = times.wrap("state file", f.server._save_state)
    run_folder.save_model = times.wrap("model files", run_folder.save_model)
    f.server._record_round = times.wrap("model files + logging", f.server._record_round)
    f.fabric.backward = times.wrap("step", f.fabric.backward)
    f.fabric.clip_gradients = times.wrap("step", f.fabric.clip_gradients)
    teacher_forward = f.network.forward
    in_step = {"on": False}

    def teacher(*args: Any) -> Any:
        return times.wrap("teacher", teacher_forward)(*args) if in_step["on"] else teacher_forward(*args)

    f.network.forward = teacher
    step = times.wrap("step", Objective.training_step)

    def training_step(self: Objective, *args: Any) -> Any:
        in_step["on"] = True
        try:
            return step(self, *args)
        finally:
            in_step["on"] = False

    Objective.training_step = training_step
    for client in f.clients.values():
        # the scheduler's step (microseconds) stays unwrapped: its state_dict would pickle the wrapper
        client.optimizer.step = times.wrap("step", client.optimizer.step)
        client.optimizer.zero_grad = times.wrap("step", client.optimizer.zero_grad)
        for _, stream in client.sources:

            def start_round(*args: Any, _start=stream.start_round) -> Any:
                batches = _start(*args)
                return iter(lambda: times.wrap("data", next)(batches, None), None)

            stream.start_round = start_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "condistfl_synthetic.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="the last one is reported (the first warms up)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. fl.local_steps=10")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"fl.rounds={args.rounds}", f"output_dir={out}", *QUIET, *args.overrides])
        fabric = build_fabric(cfg)
        federation = Federation(cfg, fabric)
        times = PhaseTimes()
        instrument(federation, times)
        start = time.perf_counter()
        federation.fit()
        wall = time.perf_counter() - start
        last = args.rounds

    got = {phase: s for (r, phase), s in times.seconds.items() if r == last}
    local, steps, data, teacher = got["local training"], got["step"], got.get("data", 0.0), got.get("teacher", 0.0)
    checkpoint = got["state file"] + got["model files"]
    logging = got["model files + logging"] - got["model files"]  # _record_round saves best/last, then logs
    overhead = local - steps - data
    validation, aggregation = got.get("validation", 0.0), got["aggregation"]
    round_total = local + aggregation + validation + checkpoint + logging
    print(
        f"config {args.config.name}: {len(cfg.data.sites)} sites × {cfg.fl.local_steps} local steps, "
        f"{torch.get_num_threads()} threads, precision {cfg.fabric.precision}; round {last} of {args.rounds} "
        f"(whole run {wall:.1f} s incl. the final test)\n"
    )
    rows = [
        ("local steps", steps),
        ("  of which teacher forwards", teacher),
        ("data (crops, augmentation)", data),
        ("loop overhead", overhead),
        ("aggregation", aggregation),
        ("validation", validation),
        ("checkpoint", checkpoint),
        ("logging", logging),
        ("round", round_total),
    ]
    print(f"{'phase':<32}{'s':>9}{'share':>9}")
    for name, seconds in rows:
        print(f"{name:<32}{seconds:>9.2f}{seconds / round_total:>9.1%}")
    print(f"\nloop overhead / local steps = {overhead / steps:.1%}   (goal ≤ 3 %)")


if __name__ == "__main__":
    main()
