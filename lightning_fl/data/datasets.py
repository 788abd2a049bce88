"""Per-site data: datalist JSON → cached MONAI datasets → an endless shuffled stream of patch batches.

The datalist layout is the Medical Segmentation Decathlon's (`training` / `validation` / `testing`
lists of `{"image", "label"}` paths relative to the datalist's folder); synthetic and real data
share it, so nothing here knows which one it reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import monai.transforms as mt
import torch
from filelock import FileLock, Timeout
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from omegaconf import DictConfig
from torch.utils.data import RandomSampler

from lightning_fl.config import all_sites
from lightning_fl.data.transforms import evaluation_transform, training_transform
from lightning_fl.data.validation import SPLITS, DataCheckError, check_datalist, is_file
from lightning_fl.errors import DatalistError
from lightning_fl.labels import LabelSpace


@dataclass
class SiteData:
    """A site's data as training and scoring use it, read once from its datalist.

    Holds the site's name, its foreground classes as indices of the unified label space (the
    classes it labels: what its marginal loss supervises and what it is scored on) and its cases
    per split, with absolute image and label paths.
    """

    name: str
    foreground: list[int]
    splits: dict[str, list[dict[str, str]]]

    @property
    def num_training_cases(self) -> int:
        """How many training cases the site has (its weight under `fl.weighting=cases`)."""
        return len(self.splits["training"])


def nifti_stem(path: str | Path) -> str:
    """A NIfTI file's name without `.nii` or `.nii.gz`: the case's name."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def read_datalist(path: Path, required: tuple[str, ...] = SPLITS) -> dict[str, list[dict[str, str]]]:
    """Every split of a datalist, with image and label paths made absolute and checked to exist;
    a malformed datalist is refused with all its problems (`validation.check_datalist`)."""
    if not is_file(path):
        raise DatalistError(f"datalist not found: {path}")
    entries, problems = check_datalist(path, required)
    if problems:
        raise DataCheckError(problems)
    splits: dict[str, list[dict[str, str]]] = {split: entries[split] for split in required}  # no problems: no None
    for split, items in splits.items():
        for i, item in enumerate(items):
            for key in ("image", "label"):
                if not is_file(Path(item[key])):
                    raise DatalistError(f"{path}: {split}[{i}] {key} file not found: {item[key]}")
    return splits


def load_site(root: Path, site: DictConfig, labels: LabelSpace, required: tuple[str, ...] = SPLITS) -> SiteData:
    """A configured site's `SiteData`, its datalist read from `root` (the `required` splits must be there)."""
    return SiteData(
        name=site.name,
        foreground=labels.foreground(site.classes, where=f"site '{site.name}'"),
        splits=read_datalist(root / site.datalist, required),
    )


def prepare_data_root(cfg: DictConfig, labels: LabelSpace) -> Path:
    """The folder holding the datalists; a configured synthetic federation is generated there on
    first use and reused afterwards, but only if it was generated from the same settings. One
    command generates it (under a lock beside it) while any other started at once waits for it."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is None:
        if not root.is_dir():
            raise DatalistError(f"data.root does not exist: {root}")
        return root
    from lightning_fl.data.synthetic import MANIFEST, manifest_text, write_federation

    sites = all_sites(cfg)
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root.parent / f".{root.name}.lock"))  # several commands started at once
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another command to finish generating {root}")
            lock.acquire()
        try:
            if not root.exists():  # else another command made it while this one waited
                write_federation(root, cfg.data.synthetic, sites, labels, progress=cfg.logger.progress)
        finally:
            lock.release()
    manifest = root / MANIFEST
    if not manifest.is_file() or manifest.read_bytes() != manifest_text(cfg.data.synthetic, sites, labels).encode():
        raise DatalistError(
            f"data.root {root} holds data that was not generated from this config's synthetic settings "
            f"or by this version of the generator (see {manifest.name}); delete the folder to regenerate it, "
            f"or set data.root elsewhere"
        )
    return root


class TrainingStream:
    """A site's training patches: `batch_size × samples_per_volume` per batch.

    Each round draws its batches from a seed (see `distributed.site_seed`) that fixes the shuffle
    order and every random crop and augmentation, so a site's batches do not depend on where or
    after whom it runs, and a rank that trains a share of a site takes its share of the same batch.
    A round is one pass of one loader over as many shuffled epochs as its steps need: its workers
    start once a round (seeded from the round's generator), not once per epoch, and every batch
    is full.
    """

    def __init__(self, site: SiteData, data: DictConfig, class_names: Sequence[str]) -> None:
        transform = training_transform(data, [0, *site.foreground], class_names)
        self.dataset = cached_dataset(site.splits["training"], transform, data)
        self.batch_size, self.num_workers = data.batch_size, data.num_workers
        self.generator = torch.Generator()

    def start_round(self, seed: int, batches: int, shard: tuple[int, int] = (0, 1)) -> Iterator[dict]:
        """`batches` batches for one round; `shard` = (index, count) keeps every count-th patch from index on."""
        self.generator.manual_seed(seed)  # MONAI's DataLoader seeds the transforms (or each worker's) from it
        sampler = RandomSampler(self.dataset, num_samples=batches * self.batch_size, generator=self.generator)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=self.generator,
            num_workers=self.num_workers,
        )
        index, count = shard
        for batch in loader:
            yield {key: batch[key][index::count] for key in ("image", "label")}


def cached_dataset(items: list[dict[str, str]], transform: mt.Compose, data: DictConfig) -> Dataset:
    """Preprocess each case once: on disk under `data.cache_dir` when it is set (kept across runs;
    the transforms are part of each entry's key, so a changed pipeline never reads a stale entry),
    else in memory for `data.cache_rate` of the cases. Random transforms run on every draw."""
    if data.cache_dir is not None:
        return PersistentDataset(
            items, transform, cache_dir=Path(data.cache_dir).expanduser(), hash_transform=pickle_hashing
        )
    return CacheDataset(items, transform, cache_rate=data.cache_rate, progress=False, num_workers=None)


def evaluation_loader(items: list[dict[str, str]], data: DictConfig, transform: mt.Compose | None = None) -> DataLoader:
    """Whole preprocessed volumes, one per batch, cached for the per-round validation."""
    dataset = cached_dataset(items, evaluation_transform(data) if transform is None else transform, data)
    return DataLoader(dataset, batch_size=1, num_workers=data.num_workers)
