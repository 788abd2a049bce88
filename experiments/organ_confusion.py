"""Where a model's organ errors go, on the synthetic federation's test cases: the phantoms are drawn
again from their seeds, so every voxel's true class is known (a site's label map holds only its own
classes). For each organ, of its voxels the model missed, the share it gave to each other organ or to
background, and of the voxels it wrongly called that organ, the share each true class gave; beside
them, the share of the organ's voxels that touch another organ (26-neighbourhood). Predictions are
`lightning-fl infer`'s, on each case's own grid. Writes `organ_confusion.md` into the output folder.

    python experiments/organ_confusion.py experiments/results/testbed/runs/centralized/seed0/best.ckpt \
        --output experiments/results/testbed
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.data import synthetic
from lightning_fl.data.datasets import nifti_stem, read_datalist
from lightning_fl.inference import infer_file, load_trained
from lightning_fl.labels import LabelSpace

ORGANS = ("liver", "spleen", "pancreas", "kidney")


def confusion(checkpoint: Path, split: str) -> tuple[dict[str, Counter], dict[str, Counter], dict[str, list[int]], int]:
    """Per organ (at the site that labels it): missed voxels by predicted class, false voxels by true
    class, and [voxels, voxels touching another organ]; and the number of cases."""
    model = load_trained(checkpoint, ["fabric.accelerator=cpu"])
    cfg, labels = model.cfg, LabelSpace.of(model.cfg.labels)
    names = list(labels.classes)
    missed: dict[str, Counter] = {}
    false: dict[str, Counter] = {}
    contact: dict[str, list[int]] = {}
    cases = 0
    with tempfile.TemporaryDirectory() as tmp:
        for site in cfg.data.sites:
            organs = [c for c in site.classes if c in ORGANS]
            if not organs:
                continue
            for item in read_datalist(Path(cfg.data.root).expanduser() / site.datalist)[split]:
                image = Path(item["image"])
                index = int(nifti_stem(image).rsplit("_", 1)[1])
                truth = synthetic.draw_case(cfg.data.synthetic, site, index, labels)[1]
                (written,) = infer_file(model, image, Path(tmp))
                pred = np.asarray(nib.load(written).dataobj)
                cases += 1
                for organ in organs:
                    k = names.index(organ)
                    inside = truth == k
                    touching = ndimage.binary_dilation((truth > 0) & ~inside, np.ones((3, 3, 3), bool)) & inside
                    missed.setdefault(organ, Counter()).update(names[v] for v in pred[inside & (pred != k)].ravel())
                    false.setdefault(organ, Counter()).update(names[v] for v in truth[(pred == k) & ~inside].ravel())
                    counts = contact.setdefault(organ, [0, 0])
                    counts[0] += int(inside.sum())
                    counts[1] += int(touching.sum())
    return missed, false, contact, cases


def table(missed: dict[str, Counter], false: dict[str, Counter], contact: dict[str, list[int]]) -> str:
    """One row per organ: its voxels, the share touching another organ, where the misses went and
    where the false voxels came from (shares of each, largest first)."""

    def shares(counts: Counter) -> str:
        total = sum(counts.values())
        return ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in counts.most_common(4)) if total else "none"

    rows = [
        "| organ | voxels | touching another organ | missed: called | missed voxels | false: truly | false voxels |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for organ, (voxels, touching) in contact.items():
        rows.append(
            f"| {organ} | {voxels} | {100 * touching / voxels:.0f} % | {shares(missed[organ])} | "
            f"{sum(missed[organ].values())} | {shares(false[organ])} | {sum(false[organ].values())} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="best.ckpt or last.ckpt of a run on the synthetic federation")
    parser.add_argument("--output", type=Path, required=True, help="folder for organ_confusion.md")
    parser.add_argument("--split", default="testing", help="datalist split (default: testing)")
    args = parser.parse_args()
    missed, false, contact, cases = confusion(args.checkpoint, args.split)
    text = (
        f"# Where the organ errors go\n\n`{args.checkpoint}` on the `{args.split}` cases of the sites that label "
        f"each organ ({cases} cases), against the phantoms' full labels, each case on its own grid. Written by "
        f"`python experiments/organ_confusion.py {args.checkpoint} --output {args.output}`.\n\n"
        f"{table(missed, false, contact)}\n"
    )
    target = args.output / "organ_confusion.md"
    atomic_write_text(target, text)
    print(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
