"""Per-case test Dice against the size of what is segmented, for a finished sweep's tumour classes
(or any classes): whether a low mean Dice comes from the method or from cases whose tumour is a few
voxels. Reads the sweep's run folders and each test case's label map (from the runs' data root) and
writes `dice_by_size.md` (mean Dice per size bin) and `dice_by_size.png` (every case) beside the
sweep's `results.md`.

    python experiments/tumour_size.py experiments/results/testbed [--classes liver_tumor kidney_tumor]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lightning_fl.analysis import dice_by_size_figure, write_png
from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.data.datasets import nifti_stem, read_datalist
from lightning_fl.errors import UserInputError
from lightning_fl.labels import LabelSpace
from lightning_fl.results import headline_rows, nanmean, read_sweep
from lightning_fl.run_folder import TEST

TUMOURS = ("liver_tumor", "pancreas_tumor", "kidney_tumor")
BINS_ML = (1.0, 10.0, 100.0)  # the table's size bins: < 1 ml, 1–10 ml, 10–100 ml, ≥ 100 ml
Points = dict[str, dict[str, list[tuple[float, float]]]]  # class → variant → (volume ml, Dice)


def class_volume_ml(label_path: Path, index: int) -> float:
    """A class's volume in one label map (ml): its voxel count times the NIfTI voxel volume."""
    image = nib.load(label_path)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
    return float(np.count_nonzero(np.asarray(image.dataobj) == index)) * voxel_ml


def dice_by_size(folder: Path, classes: Sequence[str]) -> Points:
    """Every test case's Dice of each class, with the class's volume in that case, per variant (all seeds)."""
    results, configs = read_sweep(folder)
    cfg = next(iter(configs.values()))
    labels = LabelSpace.of(cfg.labels)
    root = Path(cfg.data.root).expanduser()
    label_of = {
        (site.name, nifti_stem(item["image"])): Path(item["label"])
        for site in cfg.data.sites
        for item in read_datalist(root / site.datalist, ("testing",))["testing"]
    }
    volumes: dict[tuple[str, str, str], float] = {}
    points: Points = {cls: {} for cls in classes}
    for (variant, _), rows in results.items():
        for row in headline_rows(rows):
            if row.phase == TEST and row.cls in points and row.dice is not None:
                key = (row.site, row.case, row.cls)
                if key not in volumes:
                    volumes[key] = class_volume_ml(label_of[key[:2]], labels.index(row.cls))
                points[row.cls].setdefault(variant, []).append((volumes[key], row.dice))
    return {cls: by_variant for cls, by_variant in points.items() if by_variant}


def size_table(points: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]) -> str:
    """Markdown: per class and size bin, how many case scores fall in it and each variant's mean Dice there."""
    edges = (0.0, *BINS_ML, math.inf)
    inner = [f"{a:g}–{b:g} ml" for a, b in zip(BINS_ML, BINS_ML[1:])]
    names = [f"< {BINS_ML[0]:g} ml", *inner, f"≥ {BINS_ML[-1]:g} ml"]
    lines = []
    for cls, by_variant in points.items():
        variants = list(by_variant)
        lines += [f"### {cls}", "", "| volume | " + " | ".join(f"{v} (n)" for v in variants) + " |"]
        lines.append("| --- |" + " --- |" * len(variants))
        for name, low, high in zip(names, edges, edges[1:]):
            cells = []
            for variant in variants:
                dice = [d for ml, d in by_variant[variant] if low <= ml < high]
                cells.append(f"{nanmean(dice):.3f} ({len(dice)})" if dice else "n/a (0)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep's output folder (results.md, runs/)")
    parser.add_argument("--classes", nargs="+", default=list(TUMOURS))
    args = parser.parse_args()
    if not (args.sweep / "runs").is_dir():
        print(f"error: {args.sweep}: not a sweep's output folder (no runs/ in it)", file=sys.stderr)
        sys.exit(2)
    try:
        points = dice_by_size(args.sweep, args.classes)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if not points:
        print(f"error: {args.sweep}: no finished run scored any of {args.classes} on a test case", file=sys.stderr)
        sys.exit(2)
    command = " ".join(["python experiments/tumour_size.py", str(args.sweep), "--classes", *args.classes])
    header = (
        f"# Test Dice by the size of the structure\n\n"
        f"Each test case's Dice of the class (the headline model of every seed's run), by the class's volume in "
        f"that case; n = case scores (case × seed). Written by `{command}`.\n\n"
    )
    atomic_write_text(args.sweep / "dice_by_size.md", header + size_table(points))
    write_png(args.sweep / "dice_by_size.png", dice_by_size_figure(points))
    print(f"wrote {args.sweep / 'dice_by_size.md'} and dice_by_size.png")


if __name__ == "__main__":
    main()
