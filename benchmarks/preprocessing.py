"""How fast the paper's data pipeline turns real CT volumes into training patches, on CPU.

Runs `lightning_fl.data.transforms` on the two real cases of the real CT volumes folder (read in place)
and prints, per case and in total, seconds per case and cases per second (median of --repeats
runs after one warm-up) for
  1. the deterministic preprocessing (evaluation_transform: load, RAS, resample, HU window), what a
     CacheDataset pays once per case;
  2. one training sample draw: the random part of training_transform (from RandCropByPosNegLabeld
     on, samples_per_volume patches) applied to the cached deterministic part, seeded; the mean of
     --draws draws, because the cost depends on which augmentations fire. This is the per-volume
     CPU cost a data-loader worker pays at every step. The full training_transform for reference
     (one seeded draw, so its augmentations are those of that seed);
  3. a PersistentDataset holding that cached part (volumes + foreground/background indices) in a
     temporary folder: first pass (compute + write) and second pass (read back), with its size;
and then how many data-loader workers keep up with a training step of --step-seconds
(workers = ceil((draw + cache read) seconds × data.batch_size / step seconds)).

    python benchmarks/preprocessing.py [--config configs/condistfl_paper.yaml] [--repeats 3]
        [--draws 16] [--threads N] [--step-seconds 0.25] [--realdata DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import monai.transforms as mt
import torch
from _timing import add_realdata_argument, median_times, require_realdata
from monai.data import PersistentDataset

from lightning_fl.config import load_config
from lightning_fl.data.transforms import evaluation_transform, training_transform

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "spleen_8": ("spleen_8_ct.nii.gz", "spleen_8_label_orig.nii.gz"),
    "ts_example": ("ts_example_ct.nii.gz", "ts_example_ct_pred_total_fast.nii.gz"),
}


def median_time(fn: Callable[[], object], repeats: int, setup: Callable[[], object] = lambda: None) -> float:
    return median_times([fn], repeats, setup=setup)[0]


def split_at_first_random(pipeline: mt.Compose) -> tuple[mt.Compose, mt.Compose]:
    """The deterministic head that CacheDataset keeps, and the random tail run at every draw."""
    first = pipeline.get_index_of_first(lambda t: isinstance(t, mt.RandomizableTrait))
    return mt.Compose(pipeline.transforms[:first]), mt.Compose(pipeline.transforms[first:])


def shape(sizes: Iterable[int]) -> str:
    """512x512x32: the spatial sizes as the table prints them."""
    return "x".join(str(int(n)) for n in sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "condistfl_paper.yaml")
    add_realdata_argument(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draws", type=int, default=16, help="training sample draws averaged per repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--step-seconds", type=float, default=0.25, help="training step time to keep up with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.patch_size=[128,128,64]")
    args = parser.parse_args()
    require_realdata(args.realdata, [f for pair in CASES.values() for f in pair])
    files = {name: [args.realdata / f for f in pair] for name, pair in CASES.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    data, classes = cfg.data, cfg.labels.classes
    spleen = [0, 3]  # the spleen site's classes: the label values of spleen_8
    head, tail = split_at_first_random(training_transform(data, spleen, classes))
    evaluation, full = evaluation_transform(data), training_transform(data, spleen, classes)
    print(
        f"config {args.config.name}: spacing {list(data.spacing_mm)} mm, patch {list(data.patch_size)}, "
        f"{data.samples_per_volume} samples per volume, batch {data.batch_size} volumes; "
        f"{torch.get_num_threads()} torch threads; median of {args.repeats} after 1 warm-up"
    )

    rows: list[tuple[str, str, str, float]] = []
    draw_seconds: list[float] = []
    read_seconds: list[float] = []
    cache_mb = 0.0
    for name, (image, label) in files.items():
        item = {"image": str(image), "label": str(label)}
        out = evaluation(item)["image"]
        size = f"{shape(out.meta['spatial_shape'])}→{shape(out.shape[1:])}"
        cached = head(item)

        def draws() -> None:
            tail.set_random_state(args.seed)
            for _ in range(args.draws):
                tail(cached)

        def full_draw() -> None:
            full.set_random_state(args.seed)
            full(item)

        draw = median_time(draws, args.repeats) / args.draws
        draw_seconds.append(draw)
        patches = f"→{data.samples_per_volume}×{shape(data.patch_size)}"
        rows += [
            (name, size, "preprocess (evaluation_transform)", median_time(lambda: evaluation(item), args.repeats)),
            (name, patches, f"sample draw (random part, mean of {args.draws})", draw),
            (name, patches, "full training_transform (one seeded draw)", median_time(full_draw, args.repeats)),
        ]

        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            dataset = PersistentDataset([item], head, cache_dir=cache)
            first = median_time(lambda: dataset[0], args.repeats, setup=lambda: [f.unlink() for f in cache.iterdir()])
            second = median_time(lambda: dataset[0], args.repeats)
            read_seconds.append(second)
            cache_mb += sum(f.stat().st_size for f in cache.iterdir()) / 2**20
        rows += [
            (name, size, "PersistentDataset 1st pass (cached part + write)", first),
            (name, size, "PersistentDataset 2nd pass (read)", second),
        ]

    stages = list(dict.fromkeys(stage for _, _, stage, _ in rows))
    rows += [
        ("total", f"{len(files)} cases", stage, statistics.mean(s for _, _, st, s in rows if st == stage))
        for stage in stages
    ]
    print(f"\n{'case':<12}{'shape in→out':<28}{'stage':<50}{'s/case':>8}{'cases/s':>9}")
    for case, size, stage, seconds in rows:
        print(f"{case:<12}{size:<28}{stage:<50}{seconds:>8.3f}{1 / seconds:>9.2f}")
    print(
        f"\nPersistentDataset cache on disk: {cache_mb:.0f} MB for {len(files)} cases "
        "(volumes + foreground/background indices)"
    )
    per_volume = statistics.mean(draw_seconds) + statistics.mean(
        read_seconds
    )  # a worker reads the cached case, then draws
    workers = math.ceil(per_volume * data.batch_size / args.step_seconds)
    threads = torch.get_num_threads()
    print(
        f"data-loader workers to keep up with a {args.step_seconds} s step of {data.batch_size} volumes "
        f"({data.batch_size * data.samples_per_volume} patches): ceil(({statistics.mean(draw_seconds):.3f} s draw + "
        f"{statistics.mean(read_seconds):.3f} s read) × {data.batch_size} / {args.step_seconds} s) = {workers}"
    )
    if threads != 1:  # torch's DataLoader sets 1 thread in each worker process
        print(f"(draws timed at {threads} torch threads; a DataLoader worker runs 1: --threads 1 times it as such)")


if __name__ == "__main__":
    main()
