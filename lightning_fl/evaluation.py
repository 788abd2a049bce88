"""Sliding-window inference and per-class Dice, scored as ConDistFL reports it.

Dice is computed per volume (the argmax of the sliding-window prediction against the label), on
the preprocessed grid the model sees; a class absent from a volume's ground truth gives NaN there
and is left out of that class's mean over cases. A site reports only the classes it labels; a test
set labelled without tumours (AMOS, TotalSegmentator) is scored per organ, predicted tumours merged
into their organ as in its labels.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from lightning_fl.analysis import cross_site_figure, png_bytes
from lightning_fl.checkpoint import atomic_write_bytes, atomic_write_text
from lightning_fl.config import ConfigError
from lightning_fl.data.datasets import evaluation_loader, prepare_data_root, read_datalist
from lightning_fl.data.prepare import label_map
from lightning_fl.data.transforms import evaluation_transform
from lightning_fl.data.validation import DataCheckError, check_cases, check_site, datalist_cases
from lightning_fl.inference import TrainedModel, load_trained, sliding_logits
from lightning_fl.labels import LabelMap, LabelSpace
from lightning_fl.results import format_table, nanmean


def predict_labels(model: Callable[[Tensor], Tensor], image: Tensor, eval_cfg: DictConfig) -> Tensor:
    """Argmax class map `[B, 1, *S]` of whole volumes."""
    return sliding_logits(model, image, eval_cfg).argmax(1, keepdim=True)


def dice_per_class(pred: Tensor, label: Tensor, classes: Sequence[int]) -> Tensor:
    """Dice `[B, len(classes)]` of class maps `[B, 1, *S]`; NaN where a class is absent from the label."""
    pred_onehot = torch.cat([pred == c for c in classes], dim=1)
    label_onehot = torch.cat([label == c for c in classes], dim=1)
    return compute_dice(pred_onehot, label_onehot, include_background=True, ignore_empty=True)


@torch.no_grad()
def evaluate(
    model: Callable[[Tensor], Tensor],
    batches: Iterable[dict[str, Tensor]],
    classes: Sequence[int],
    eval_cfg: DictConfig,
    prepare: Callable[[Tensor], Tensor],
    pred_lut: Tensor | None = None,
    first_case: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> dict[int, list[float]]:
    """Per-case Dice of each class over a loader of whole volumes.

    `prepare` moves an image to the model's device and memory format; `pred_lut` remaps predicted
    classes first (organ-level scoring of the external set). `first_case` receives the first batch's
    image, label and class map as scored, so a caller can show a case without predicting it again.
    """
    scores: dict[int, list[float]] = {c: [] for c in classes}
    for index, batch in enumerate(batches):
        image = prepare(batch["image"].as_subclass(torch.Tensor))
        label = batch["label"].as_subclass(torch.Tensor).to(image.device).long()
        pred = predict_labels(model, image, eval_cfg)
        if pred_lut is not None:
            pred = pred_lut.to(pred.device)[pred]
        if index == 0 and first_case is not None:
            first_case(image, label, pred)
        for c, values in zip(classes, dice_per_class(pred, label, classes).T):
            scores[c] += values.tolist()
    return scores


def dice_table(
    scores: Mapping[str, Mapping[str, Mapping[str, float]]], class_order: Sequence[str], per_organ: Sequence[str] = ()
) -> tuple[list[str], list[list[str]]]:
    """`{model: {test set: {class: Dice}}}` → header and rows of a (test set, class) × model table,
    with the mean over the sites' classes and, apart, the mean of each per-organ set."""
    models = list(scores)
    sets = list(next(iter(scores.values())))
    rows = [
        [f"{name}: {c}", *(_fmt(scores[m][name].get(c, math.nan)) for m in models)]
        for name in sets
        for c in class_order
        if any(c in scores[m][name] for m in models)
    ]
    groups = [("mean", [s for s in sets if s not in per_organ])] + [(f"{s}: mean", [s]) for s in sets if s in per_organ]
    for title, members in groups:
        if members:
            rows.append([title, *(_fmt(nanmean([d for s in members for d in scores[m][s].values()])) for m in models)])
    return ["test set: class", *models], rows


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def cross_site_csv(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per (model, site, class): the long format pandas and plotting tools read directly."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "site", "class", "dice"])
    for model, sites in scores.items():
        for site, dice in sites.items():
            for name, value in dice.items():
                writer.writerow([model, site, name, "" if math.isnan(value) else f"{value:.6f}"])
    return out.getvalue()


def cross_site_heatmap(scores: Mapping[str, Mapping[str, Mapping[str, float]]], title: str) -> bytes:
    """PNG: models × (site, class) Dice, annotated, on a fixed 0–1 colour scale (the sweeps' heatmap)."""
    models = list(scores)
    columns = [(site, c) for site, dice in scores[models[0]].items() for c in dice]
    values = np.array([[scores[m][site].get(c, math.nan) for site, c in columns] for m in models])
    return png_bytes(cross_site_figure(models, [f"{site}/{c}" for site, c in columns], values, title))


@dataclass
class EvalSet:
    """Cases to score and how: which unified classes their labels hold, read through which map."""

    name: str
    source: Path  # its datalist
    items: list[dict[str, str]]
    classes: list[int]
    per_organ: bool = False
    label_map: LabelMap | None = None


def score_cases(
    model: Callable[[Tensor], Tensor],
    loader: Iterable[dict[str, Tensor]],
    classes: Sequence[int],
    labels: LabelSpace,
    eval_cfg: DictConfig,
    prepare: Callable[[Tensor], Tensor],
    per_organ: bool = False,
    first_case: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> dict[str, list[float]]:
    """Per-case Dice of each class, by class name; `per_organ` merges predicted tumours into their
    organ; `first_case` as in `evaluate`."""
    lut = torch.as_tensor(labels.organ_lut()) if per_organ else None
    scores = evaluate(model, loader, classes, eval_cfg, prepare, pred_lut=lut, first_case=first_case)
    return {labels.classes[c]: values for c, values in scores.items()}


def site_test_sets(cfg: DictConfig, labels: LabelSpace, split: str) -> list[EvalSet]:
    """Every site's `split` with its own classes, and each external site (testing, per organ), as in `fit`."""
    root = prepare_data_root(cfg, labels)
    chosen = [(s, split, False) for s in cfg.data.sites] + [(s, "testing", True) for s in cfg.data.external]
    problems = [p for site, part, _ in chosen for p in check_site(root, site, labels, (part,))]
    if problems:  # refused before any scoring, as `fit` refuses them before training
        raise DataCheckError(problems)
    return [
        EvalSet(
            site.name,
            root / site.datalist,
            read_datalist(root / site.datalist, (part,))[part],
            labels.foreground(site.classes, where=f"site '{site.name}'"),
            per_organ,
        )
        for site, part, per_organ in chosen
    ]


def datalist_test_set(datalist: Path, split: str, labels: LabelSpace, mapping: LabelMap | None) -> EvalSet:
    """A datalist's split: labels in the unified space (every class scored where present), or in
    another scheme read through `mapping` (its classes scored)."""
    items = read_datalist(datalist, (split,))[split]
    cases = datalist_cases({split: items})
    problems = check_cases(str(datalist), cases, None if mapping else range(labels.num_classes), mapping)
    if problems:  # refused before any scoring: a fractional or unknown label value is no "absent organ"
        raise DataCheckError(problems)
    if mapping is None:
        return EvalSet(datalist.stem, datalist, items, list(range(1, labels.num_classes)))
    return EvalSet(datalist.stem, datalist, items, mapping.classes, mapping.per_organ, mapping)


def evaluate_models(
    checkpoints: Sequence[Path],
    overrides: list[str],
    output: Path,
    split: str = "testing",
    datalist: Path | None = None,
    label_map_name: str | None = None,
    cross_site: bool = False,
) -> dict[str, Any]:
    """`lightning-fl evaluate`: Dice of every model on every test set, printed and written to
    `output/evaluation.json` (per-case scores included), plus, across sites, `cross_site.csv` and
    `cross_site.png`. The test sets are preprocessed once and shared by the models."""
    models = [load_trained(path, overrides) for path in checkpoints]
    cfg = models[0].cfg
    _check_same_inputs(models)
    labels = LabelSpace.of(cfg.labels)
    if cross_site:
        sets = site_test_sets(cfg, labels, split)
    else:
        assert datalist is not None
        sets = [
            datalist_test_set(datalist, split, labels, label_map(label_map_name, labels) if label_map_name else None)
        ]
    names = _unique_names(models)
    scores: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    per_case: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
    bar = tqdm(
        total=len(sets) * len(models),
        desc="evaluate",
        unit="model × set",
        disable=None if cfg.logger.progress else True,
    )
    for test_set in sets:
        loader = evaluation_loader(test_set.items, cfg.data, evaluation_transform(cfg.data, test_set.label_map))
        for name, model in zip(names, models):
            p = model.predictor
            cases = score_cases(p, loader, test_set.classes, labels, model.cfg.eval, p.prepare, test_set.per_organ)
            scores[name][test_set.name] = {c: nanmean(v) for c, v in cases.items()}
            per_case[name][test_set.name] = [
                {"image": item["image"], **{c: _json_number(v[i]) for c, v in cases.items()}}
                for i, item in enumerate(test_set.items)
            ]
            bar.update()
    bar.close()
    report = {
        "split": split,
        "test_sets": {
            s.name: {
                "datalist": str(s.source),
                "cases": len(s.items),
                "classes": [labels.classes[c] for c in s.classes],
                "per_organ": s.per_organ,
                "label_map": s.label_map.name if s.label_map else None,
            }
            for s in sets
        },
        "models": {
            name: {
                "file": str(m.path),
                "round": m.round,
                "dice": {k: {c: _json_number(v) for c, v in d.items()} for k, d in scores[name].items()},
                "per_case": per_case[name],
            }
            for name, m in zip(names, models)
        },
    }
    atomic_write_text(output / "evaluation.json", json.dumps(report, indent=2) + "\n")
    written = [output / "evaluation.json"]
    if cross_site:
        atomic_write_text(output / "cross_site.csv", cross_site_csv(scores))
        png = cross_site_heatmap(scores, f"Dice on each site's {split} split (external: testing, per organ)")
        atomic_write_bytes(output / "cross_site.png", lambda f: f.write(png))
        written += [output / "cross_site.csv", output / "cross_site.png"]
    header, rows = dice_table(scores, labels.classes, [s.name for s in sets if s.per_organ])
    print(format_table(rows, header))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return report


def _check_same_inputs(models: Sequence[TrainedModel]) -> None:
    """Models compared on shared, once-preprocessed test sets must expect the same inputs and classes."""
    first = models[0]
    for model in models[1:]:
        for key in ("labels", "data.spacing_mm", "data.intensity"):
            a, b = (OmegaConf.to_container(OmegaConf.select(m.cfg, key)) for m in (first, model))
            if a != b:
                raise ConfigError(f"{model.path} has {key}={b}, but {first.path} has {a}; evaluate them separately")


def _unique_names(models: Sequence[TrainedModel]) -> list[str]:
    names = [m.name for m in models]
    return names if len(set(names)) == len(names) else [str(m.path) for m in models]


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value
