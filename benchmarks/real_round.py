"""Time and memory of the paper's setting on real CT, measured end to end through `fit`.

One real case (spleen_8 of the real CT volumes folder, read in place) is copied five times into an MSD Task09
layout and goes through `prepare-data`; then `fit` runs the paper config on that one site for one
round, twice, with two local step counts, after a 1-step run has filled the disk cache (else the
first timed run would also pay for preprocessing). The difference of the two round times over the
difference of the steps is the time of one training step with everything around it (data-loader
workers drawing patches, bf16 step, optimizer); what is left of a round is the validation of one
case and the round's overhead (checkpoints). From the step time it projects the training part of
the paper's round, 4 sites × 1000 steps; validation adds 132 cases (liver 26, spleen 8,
pancreas 56, kidney 42) at less than benchmarks/inference_time.py's time per case (which also reads,
resamples back and writes).

    python benchmarks/real_round.py [--steps 10 40] [--realdata DIR] [key=value ...]
    e.g. on a GPU:  python benchmarks/real_round.py data.num_workers=8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import add_realdata_argument, require_realdata

from lightning_fl.config import load_config
from lightning_fl.data.prepare import prepare_task
from lightning_fl.distributed import resolve_precision
from lightning_fl.labels import LabelSpace

REPO = Path(__file__).resolve().parent.parent
PAPER_VALIDATION_CASES = 26 + 8 + 56 + 42
PAPER_SITES, PAPER_STEPS = 4, 1000


def task09_layout(realdata: Path, folder: Path, copies: int = 5) -> Path:
    """spleen_8 as `copies` cases of an MSD Task09 folder (imagesTr, labelsTr, dataset.json)."""
    entries = []
    for i in range(copies):
        for kind, name in (("imagesTr", "spleen_8_ct.nii.gz"), ("labelsTr", "spleen_8_label_orig.nii.gz")):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(realdata / name, folder / kind / f"spleen_{i}.nii.gz")
        entries.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": entries}))
    return folder


def round_summary(data: Path, out: Path, steps: int, overrides: list[str]) -> dict:
    """One round of `fit` on the spleen site alone; its summary.json."""
    command = [
        sys.executable,
        "-m",
        "lightning_fl",
        "fit",
        "--config",
        str(REPO / "configs" / "condistfl_paper.yaml"),
        f"output_dir={out}",
        f"data.root={data}",
        "data.sites=[{name: spleen, datalist: spleen.json, classes: [spleen]}]",
        "data.external=[]",
        "fl.rounds=1",
        f"fl.local_steps={steps}",
        "logger.wandb.mode=disabled",
        "data.check_before_fit=false",  # the copies of one case are a leak by design
        "logger.progress=false",
        *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        sys.exit(f"fit failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 40], metavar=("FEW", "MANY"))
    add_realdata_argument(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. data.num_workers=8 fabric.accelerator=gpu"
    )
    args = parser.parse_args()
    require_realdata(args.realdata, ["spleen_8_ct.nii.gz"])
    few, many = args.steps
    if not 0 < few < many:
        sys.exit("error: --steps FEW MANY needs 0 < FEW < MANY")
    cfg = load_config(REPO / "configs" / "condistfl_paper.yaml", args.overrides)
    labels = LabelSpace.of(cfg.labels)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare_task("spleen", task09_layout(args.realdata, folder / "Task09_Spleen"), folder / "data", labels)
        round_summary(
            folder / "data", folder / "warm-up", 1, args.overrides
        )  # fills the disk cache both timed runs read
        runs = {
            steps: round_summary(folder / "data", folder / f"run{steps}", steps, args.overrides)
            for steps in (few, many)
        }
    times = {steps: summary["round_time_s"][0] for steps, summary in runs.items()}
    step = (times[many] - times[few]) / (many - few)
    rest = times[few] - few * step  # validation of the one validation case, and the round's overhead
    summary = runs[many]
    gpu = summary.get("peak_gpu_memory_mb")
    print(
        f"paper config, one real site (spleen_8 ×5: 3 training, 1 validation, 1 test cases), "
        f"data.num_workers={cfg.data.num_workers}, precision {resolve_precision(cfg.fabric)}\n"
    )
    print(f"{'local steps':<14}{'round s':>10}")
    for steps in (few, many):
        print(f"{steps:<14}{times[steps]:>10.1f}")
    print(f"\none training step, data loading included: {step:.3f} s")
    print(f"validation of one case and the round's overhead: {rest:.1f} s")
    print(
        f"peak memory: host {max(summary['peak_host_memory_mb']) / 1024:.1f} GiB"
        + (f", GPU {max(gpu) / 1024:.1f} GiB" if gpu else "")
    )
    print(
        f"training part of a paper round on one device ({PAPER_SITES} sites × {PAPER_STEPS} steps): "
        f"{PAPER_SITES * PAPER_STEPS * step / 60:.0f} min, plus validating {PAPER_VALIDATION_CASES} cases "
        f"(at most benchmarks/inference_time.py's seconds per case)"
    )


if __name__ == "__main__":
    main()
