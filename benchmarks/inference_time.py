"""How long the paper's network takes on a real CT volume, the unit of validation and of `infer`.

Times `lightning_fl.inference.infer_file` (preprocess, Gaussian sliding window, resample the class
probabilities back, write) on the real CT volumes (the folder --realdata names, read in place), with a
model from --checkpoint or, by default, the config's network with seeded random weights (the time
does not depend on the weights). Prints seconds per volume (median of --repeats after one warm-up)
and the peak GPU memory; with --torchscript also exports the model and reports how many voxels the
TorchScript model labels like the checkpoint.

    python benchmarks/inference_time.py [--config configs/condistfl_paper.yaml] [--checkpoint CKPT]
        [--repeats 2] [--torchscript] [--realdata DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _timing import add_realdata_argument, median_times, require_realdata
from omegaconf import OmegaConf

from lightning_fl.build import build_run
from lightning_fl.checkpoint import save_model
from lightning_fl.config import load_config
from lightning_fl.inference import export_torchscript, infer_file, load_trained

REPO = Path(__file__).resolve().parent.parent
VOLUMES = ("spleen_8_ct.nii.gz", "ts_example_ct.nii.gz")


def seeded_checkpoint(config: Path, overrides: list[str], folder: Path) -> Path:
    """A checkpoint of the config's initial global model (the run's recipe, seeded), as `fit` writes one."""
    cfg = load_config(config, overrides)
    network = build_run(cfg).network
    path = folder / "random.ckpt"
    save_model(
        path,
        network.state_dict(),
        round=None,
        score=None,
        classes=list(cfg.labels.classes),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "condistfl_paper.yaml")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the config's network, seeded random weights"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torchscript", action="store_true", help="also export model.ts and compare its labels")
    add_realdata_argument(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. fabric.accelerator=cpu eval.sw_batch_size=2"
    )
    args = parser.parse_args()
    require_realdata(args.realdata, VOLUMES)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or seeded_checkpoint(args.config, args.overrides, folder)
        model = load_trained(checkpoint, args.overrides)
        device = model.predictor.fabric.device
        ev = model.cfg.eval
        print(
            f"{model.name} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
            f"precision {model.precision}, spacing {list(model.cfg.data.spacing_mm)} mm, roi {list(ev.roi_size)}, "
            f"overlap {ev.overlap}, sw_batch_size {ev.sw_batch_size}; median of {args.repeats} after a warm-up\n"
        )
        print(f"{'volume':<24}{'shape':>16}{'s/volume':>10}{'peak GPU GiB':>14}")
        for name in VOLUMES:
            source = args.realdata / name
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = median_times([lambda: infer_file(model, source, folder / "ckpt")], args.repeats)[0]
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
            shape = "×".join(str(n) for n in nib.load(source).shape)
            print(f"{name:<24}{shape:>16}{seconds:>10.2f}{peak:>14}")
        if args.torchscript:
            export_torchscript(model, folder / "export")
            scripted = load_trained(folder / "export" / "model.ts", args.overrides)
            for name in VOLUMES:
                infer_file(scripted, args.realdata / name, folder / "ts")
                stem = name.removesuffix(".nii.gz")
                a, b = (np.asanyarray(nib.load(folder / kind / f"{stem}.nii.gz").dataobj) for kind in ("ckpt", "ts"))
                print(f"TorchScript vs checkpoint, {name}: {(a == b).mean():.6f} of the voxels labelled alike")


if __name__ == "__main__":
    main()
