"""Per-class Dice as ConDistFL reports it (per volume, a class absent from the ground truth is NaN and
left out of its mean; MONAI and torchmetrics agree), and `evaluate`: a 1-round fit on datasets
fabricated in the MSD, KiTS19 and AMOS22 layouts, labels in other schemes, and the real CT volumes
(the `realdata` fixture)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.segmentation import DiceScore

from lightning_fl.cli import main
from lightning_fl.config import EvalConfig, load_config
from lightning_fl.data.datasets import cached_dataset
from lightning_fl.data.prepare import prepare_task
from lightning_fl.data.transforms import evaluation_transform
from lightning_fl.evaluation import dice_per_class, evaluate
from lightning_fl.labels import LabelSpace
from lightning_fl.results import nanmean
from tests.helpers.cli import refused, run_main
from tests.helpers.layouts import make_amos, make_kits, make_msd
from tests.helpers.runs import SMOKE


def _label_maps(seed: int, shape=(3, 1, 12, 10, 8), classes=6):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.7, label, torch.randint(classes, shape, generator=g))
    return pred, label


def test_monai_and_torchmetrics_per_volume_dice_agree():
    pred, label = _label_maps(0)
    classes = [1, 2, 3, 4, 5]
    ours = dice_per_class(pred, label, classes)  # [volumes, classes]
    metric = DiceScore(
        num_classes=6, include_background=False, average="none", input_format="index", aggregation_level="samplewise"
    )
    for volume in range(pred.shape[0]):
        theirs = metric(pred[volume : volume + 1, 0], label[volume : volume + 1, 0])
        torch.testing.assert_close(ours[volume], theirs.float(), rtol=1e-6, atol=1e-6)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    label = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    label[0, :, :3] = 2  # class 2 only in the first volume; class 3 nowhere
    pred = label.clone()
    pred[1, :, :1] = 2  # a false positive where the truth has no class 2
    dice = dice_per_class(pred, label, [2, 3])
    assert dice[0, 0] == 1.0 and math.isnan(dice[1, 0]) and dice[:, 1].isnan().all()
    assert nanmean(dice[:, 0].tolist()) == 1.0 and math.isnan(nanmean(dice[:, 1].tolist()))


class _Oracle(torch.nn.Module):
    """Logits that put the true class first: a model that is always right."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(image[:, 0].long(), self.num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("roi", [[8, 8, 8], [16, 16, 16]])
def test_sliding_window_evaluation_of_a_perfect_model(roi):
    from monai.data import MetaTensor

    _, label = _label_maps(1, shape=(1, 1, 20, 18, 9), classes=4)
    batches = [{"image": MetaTensor(label.float()), "label": MetaTensor(label.float())}]
    eval_cfg = OmegaConf.structured(EvalConfig(roi_size=roi, overlap=0.25, sw_batch_size=2))
    scores = evaluate(_Oracle(4), batches, [1, 3], eval_cfg, prepare=lambda x: x)
    assert scores == {1: [1.0], 3: [1.0]}
    organ_level = evaluate(_Oracle(4), batches, [1], eval_cfg, prepare=lambda x: x, pred_lut=torch.tensor([0, 1, 1, 3]))
    assert organ_level[1][0] < 1.0  # class 2 predicted as 1 now counts against class 1's Dice


@pytest.fixture(scope="module")
def fabricated_run(tmp_path_factory) -> Path:
    """Five published datasets → prepare-data → a 1-round fit (in this process), preprocessed cases
    cached on disk."""
    tmp = tmp_path_factory.mktemp("fabricated")
    cfg = load_config()
    labels = LabelSpace.of(cfg.labels)
    data = tmp / "data"
    prepare_task("liver", make_msd(tmp / "Task03_Liver", "liver", 5, [1, 2]), data, labels)
    prepare_task("spleen", make_msd(tmp / "Task09_Spleen", "spleen", 5, [1]), data, labels)
    prepare_task("pancreas", make_msd(tmp / "Task07_Pancreas", "pancreas", 5, [1, 2]), data, labels)
    prepare_task("kidney", make_kits(tmp / "kits19", 5), data, labels)
    prepare_task("amos", make_amos(tmp / "amos22"), data, labels)
    status = main(
        [
            "fit",
            "--config",
            str(SMOKE),
            f"output_dir={tmp / 'run'}",
            f"data.root={data}",
            "data.synthetic=null",
            "data.external=[{name: amos, datalist: amos.json, classes: [liver, spleen, pancreas, kidney]}]",
            f"data.cache_dir={tmp / 'cache'}",
            "data.spacing_mm=[1.6,1.6,2.5]",
            "fl.rounds=1",
            "logger.wandb.mode=disabled",
        ]
    )  # 24³ patches: bf16 Conv3d on CPU breaks at 2³ at the deepest level
    assert status == 0
    return tmp


@pytest.mark.slow
def test_fit_on_fabricated_layouts_and_cross_site_evaluation_reproduce_its_scores(cli, fabricated_run):
    """`evaluate` as a shell runs it (exit status, its table on stdout)."""
    run = fabricated_run / "run"
    cache = list((fabricated_run / "cache").glob("*.pt"))
    assert (
        len(cache) == 4 * 2 + 4 + 4 + 3
    )  # the training volumes drawn (2 steps of 1), then every validation, testing and external case
    out = fabricated_run / "evaluation"
    result = cli(
        "evaluate",
        "--checkpoint",
        str(run / "best.ckpt"),
        str(run / "last.ckpt"),
        "eval.sw_batch_size=1",
        "--cross-site",
        "--output",
        str(out),
    )  # an override after --checkpoint's files is still an override
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    best = report["models"]["run/best.ckpt"]
    site_dice = {c: d for name, dice in best["dice"].items() if name != "amos" for c, d in dice.items()}
    assert site_dice == pytest.approx(summary["test_dice"], abs=1e-6, nan_ok=True)  # None == None where no case has it
    assert best["dice"]["amos"] == pytest.approx(summary["external_dice"]["amos"], abs=1e-6)
    assert report["test_sets"]["amos"]["per_organ"] and report["test_sets"]["liver"]["classes"] == [
        "liver",
        "liver_tumor",
    ]
    assert [len(best["per_case"][s]) for s in ("liver", "kidney", "amos")] == [1, 1, 3]
    rows = list(csv.DictReader((out / "cross_site.csv").open()))
    assert len(rows) == 2 * (7 + 4) and {r["model"] for r in rows} == {"run/best.ckpt", "run/last.ckpt"}
    png = (out / "cross_site.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "amos: mean" in result.stdout and "kidney: kidney_tumor" in result.stdout


@pytest.mark.slow
def test_persistent_cache_is_keyed_by_the_pipeline(tmp_path, fabricated_run):
    item = json.loads((fabricated_run / "data" / "spleen.json").read_text())["training"][0]
    item = {k: str(fabricated_run / "data" / v) for k, v in item.items()}
    data = load_config(None, [f"data.cache_dir={tmp_path}"]).data
    first = cached_dataset([item], evaluation_transform(data), data)[0]
    again = cached_dataset([item], evaluation_transform(data), data)[0]  # read back from disk
    assert len(list(tmp_path.glob("*.pt"))) == 1 and np.array_equal(first["image"], again["image"])
    data.spacing_mm = [1.6, 1.6, 2.5]
    finer = cached_dataset([item], evaluation_transform(data), data)[0]
    assert len(list(tmp_path.glob("*.pt"))) == 2 and finer["image"].shape != first["image"].shape


def _encode(unified: np.ndarray, codes: dict[int, int], other: int) -> np.ndarray:
    """Unified classes written in another scheme's ids, and one voxel of a structure outside the map."""
    native = np.zeros(unified.shape, dtype=np.int32)
    for c, value in codes.items():
        native[unified == c] = value
    native[0, 0, 0] = other
    return native


def _evaluate_case(capsys, checkpoint: Path, image: Path, label: Path, label_map: str, output: Path) -> dict:
    """`evaluate` of one image and its label read through `label_map`, as the test set named
    after `output` (its datalist is `output`.json): the evaluation.json it writes."""
    listing = output.with_suffix(".json")
    listing.write_text(json.dumps({"testing": [{"image": str(image), "label": str(label)}]}))
    status, _, err = run_main(
        capsys,
        "evaluate",
        "--checkpoint",
        checkpoint,
        "--datalist",
        listing,
        "--label-map",
        label_map,
        "--output",
        output,
    )
    assert status == 0, err[-3000:]
    return json.loads((output / "evaluation.json").read_text())


def test_label_maps_score_the_same_anatomy_alike_and_refuse_unknown_values(capsys, tmp_path, smoke_run, data_home):
    """The same labels written with TotalSegmentator ids and with AMOS ids give the same per-organ
    Dice; a value the AMOS map does not list is an error that names the file."""
    image = sorted((data_home / "synthetic-smoke").rglob("external/images/*.nii.gz"))[0]
    status, _, _ = run_main(
        capsys, "infer", "--checkpoint", smoke_run / "best.ckpt", "--input", image, "--output", tmp_path / "pred"
    )
    assert status == 0
    pred = nib.load(next((tmp_path / "pred").glob("*.nii.gz")))
    unified = np.asanyarray(pred.dataobj)
    assert len(np.unique(unified)) >= 3, "the smoke model should predict several classes"
    schemes = {
        "totalsegmentator": ({1: 5, 2: 5, 3: 1, 4: 7, 5: 7, 6: 2, 7: 3}, 50),  # tumours drawn as their organ
        "amos": ({1: 6, 2: 6, 3: 1, 4: 10, 5: 10, 6: 3, 7: 3}, 4),
    }
    reports = {}
    for name, (codes, other) in schemes.items():
        label = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(_encode(unified, codes, other), pred.affine), label)
        report = _evaluate_case(capsys, smoke_run / "best.ckpt", image, label, name, tmp_path / name)
        reports[name] = next(iter(report["models"].values()))
    ts, amos = (reports[n]["dice"][n] for n in schemes)
    assert list(ts) == ["liver", "spleen", "pancreas", "kidney"] and ts == amos
    present = [c for c, d in ts.items() if d is not None]
    assert present and all(ts[c] > 0.7 for c in present), ts  # its own prediction, resampled there and back (0.72–0.91)
    bad = tmp_path / "amos_bad.nii.gz"
    nib.save(nib.Nifti1Image(_encode(unified, schemes["amos"][0], 99), pred.affine), bad)
    (tmp_path / "bad.json").write_text(json.dumps({"testing": [{"image": str(image), "label": str(bad)}]}))
    error = refused(
        capsys,
        "evaluate",
        "--checkpoint",
        smoke_run / "best.ckpt",
        "--datalist",
        tmp_path / "bad.json",
        "--label-map",
        "amos",
        "--output",
        tmp_path / "bad",
    )
    assert f"{bad} has label values [99] that the label map 'amos' does not list" in error


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_infer_keeps_its_grid_and_scores_against_totalsegmentator(capsys, realdata, tmp_path, smoke_run):
    ct, reference = realdata / "ts_example_ct.nii.gz", realdata / "ts_example_ct_pred_total_fast.nii.gz"
    status, _, err = run_main(
        capsys, "infer", "--checkpoint", smoke_run / "best.ckpt", "--input", ct, "--output", tmp_path
    )
    assert status == 0, err[-3000:]
    source, labels = nib.load(ct), nib.load(tmp_path / "ts_example_ct.nii.gz")
    assert labels.shape == source.shape == (122, 101, 112) and np.array_equal(labels.affine, source.affine)
    assert np.array_equal(labels.get_qform(), source.get_qform()) and np.array_equal(
        labels.get_sform(), source.get_sform()
    )
    report = _evaluate_case(capsys, smoke_run / "best.ckpt", ct, reference, "totalsegmentator", tmp_path / "ts")
    dice = next(iter(report["models"].values()))["dice"]["ts"]
    assert list(dice) == ["liver", "spleen", "pancreas", "kidney"]  # every organ is in the reference
    assert all(0.0 <= d <= 1.0 for d in dice.values()) and report["test_sets"]["ts"]["per_organ"]
