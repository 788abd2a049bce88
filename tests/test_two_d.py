"""The 2D configuration end to end (configs/smoke_2d.yaml: a 2D DynUNet of axial slices): `fit`
with its W&B overlays, two ranks killed and resumed spawned, `evaluate --cross-site`, `export` and `infer`
on a volume; slice by slice prediction against a plain loop; 2D and 3D models kept apart with one
line. (The 2D NVFlare job: tests/flare/test_nvflare.py.)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from omegaconf import OmegaConf
from PIL import Image

from lightning_fl.checkpoint import CheckpointError, check_compatible
from lightning_fl.config import load_config
from lightning_fl.inference import sliding_logits
from lightning_fl.networks import SliceWise, build_network
from lightning_fl.run_folder import RunFolder
from tests.helpers.cli import refused, run_main
from tests.helpers.runs import EXACT, SMOKE, SMOKE_2D, kill_in_round_2, last_model
from tests.helpers.wandb_records import history, offline_run, run_records

pytestmark = pytest.mark.slow


def _validation(run: Path) -> list[tuple[str, str, str, str]]:
    """Every validation score of metrics.csv: (round, site, class, Dice)."""
    rows = csv.DictReader((run / "metrics.csv").open())
    return [(r["round"], r["site"], r["class"], r["dice"]) for r in rows if r["phase"] == "validation"]


def test_a_2d_run_trains_slices_and_scores_volumes(fit_2d):
    folder = RunFolder(fit_2d)
    summary = folder.read_summary()
    cfg = OmegaConf.load(folder.config)
    assert [len(s) for s in cfg.model.strides] == [2] * len(cfg.model.strides) and cfg.data.spacing_mm[2] == 0
    assert summary["rounds"] == 2
    cases = folder.read_cases()
    assert {c.site for c in cases} >= {"liver", "spleen", "pancreas", "kidney", "external"}
    assert all(c.dice is None or 0.0 <= c.dice <= 1.0 for c in cases)


def test_wandb_gets_each_sites_overlay_of_a_predicted_volume_every_round(fit_2d):
    """The offline W&B run of the 2D fit: every round, each site's first validation volume as
    predicted slice by slice, an axial slice with its ground truth and prediction masks."""
    cfg = load_config(SMOKE_2D, ["output_dir=unused"])
    wandb_run = offline_run(fit_2d)
    rows = [row for row in history(run_records(wandb_run)) if "overlay/liver" in row]
    assert len(rows) == cfg.fl.rounds and all({f"overlay/{s.name}" for s in cfg.data.sites} <= r.keys() for r in rows)
    image = rows[-1]["overlay/liver"]
    assert image["_type"] == "image-file" and set(image["masks"]) == {"ground_truth", "prediction"}
    truth = Image.open(wandb_run / "files" / image["masks"]["ground_truth"]["path"])
    picture = Image.open(wandb_run / "files" / image["path"])
    assert truth.size == picture.size and truth.getextrema()[1] > 0  # the slice shows the liver


def test_two_ranks_killed_and_resumed_spawned_give_the_one_process_2d_run(cli, fit_2d, tmp_path):
    """Two gloo ranks (one thread each) killed at once, resumed with the other start method (spawn:
    ranks that shared one saved state, FedOpt's momentum among it, would each step it): the weights
    and validation scores of the one-process run. (The 3D run's ranks: tests/test_distributed.py;
    its kill and resume in one process: tests/test_resume.py.)"""
    killed = tmp_path / "killed"
    kill_in_round_2(
        cli, killed, *EXACT, "fabric.devices=2", "fabric.strategy=ddp", config=SMOKE_2D, OMP_NUM_THREADS="1"
    )
    resumed = cli(
        "fit", "--resume", str(killed), "--allow-config-change", "fabric.strategy=ddp_spawn", OMP_NUM_THREADS="1"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = last_model(fit_2d), last_model(killed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # bitwise
    assert _validation(killed) == _validation(fit_2d)
    assert "changed:\n  - fabric.strategy" in (killed / "resumes.yaml").read_text()
    RunFolder(killed).lock().release()


def test_evaluate_and_infer_take_volumes_from_the_checkpoint_and_its_export(capsys, fit_2d, data_home, tmp_path):
    status, _, err = run_main(capsys, "export", "--checkpoint", fit_2d / "best.ckpt", "--output", tmp_path / "export")
    assert status == 0, err
    exported = tmp_path / "export" / "model.ts"
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, "*"]
    assert metadata["inference"]["sliding_window"]["roi_size"] == [32, 32, 1]
    volume = torch.randn(1, 1, 32, 32, 5)
    assert tuple(torch.jit.load(str(exported))(volume).shape) == (1, 8, 32, 32, 5)  # the export takes a volume

    reports = []
    for model in (fit_2d / "best.ckpt", exported):
        out = tmp_path / f"evaluated_{model.suffix[1:]}"
        status, _, err = run_main(capsys, "evaluate", "--checkpoint", model, "--cross-site", "--output", out)
        assert status == 0, err
        (report,) = json.loads((out / "evaluation.json").read_text())["models"].values()
        reports.append(report)
    assert reports[0]["dice"] == reports[1]["dice"] and reports[0]["per_case"] == reports[1]["per_case"]
    sites = ("liver", "spleen", "pancreas", "kidney")
    by_class = {cls: dice for site in sites for cls, dice in reports[0]["dice"][site].items()}
    assert by_class == RunFolder(fit_2d).read_summary()["test_dice"]  # as fit scored it

    image = sorted((data_home / "synthetic-smoke").rglob("external/images/*.nii.gz"))[0]
    maps = []
    for model in (fit_2d / "best.ckpt", exported):
        out = tmp_path / f"inferred_{model.suffix[1:]}"
        status, _, err = run_main(capsys, "infer", "--checkpoint", model, "--input", image, "--output", out)
        assert status == 0, err
        written = nib.load(out / image.name)
        assert written.shape == nib.load(image).shape and np.array_equal(written.affine, nib.load(image).affine)
        maps.append(np.asanyarray(written.dataobj))
    assert np.array_equal(maps[0], maps[1])


def test_2d_and_3d_checkpoints_are_refused_by_the_other_kind_of_config(capsys, fit_2d, smoke_run, tmp_path):
    """In one line, naming both dimensionalities: on resume through the command line, and in the check itself."""
    run = tmp_path / "run_2d"
    shutil.copytree(fit_2d, run)
    to_3d = [
        "model.kernel_size=[[3,3,3],[3,3,3],[3,3,3],[3,3,3],[3,3,3]]",
        "model.strides=[[1,1,1],[2,2,2],[2,2,2],[2,2,2],[2,2,2]]",
        "data.spacing_mm=[8,8,8]",
        "data.patch_size=[32,32,32]",
        "eval.roi_size=[32,32,32]",
        "fl.rounds=3",
    ]
    line = refused(capsys, "fit", "--resume", run, "--allow-config-change", *to_3d)
    assert "holds a 2D network, but this config's model is 3D" in line and "state.ckpt" in line

    for saved_cfg, other_cfg, model in ((SMOKE_2D, SMOKE, fit_2d), (SMOKE, SMOKE_2D, smoke_run)):
        cfg, other = load_config(saved_cfg), load_config(other_cfg)
        classes = list(other.labels.classes)
        network = build_network(other.model, 1, len(classes))
        saved = torch.load(model / "best.ckpt", weights_only=True)["model"]
        dims = [len(cfg.model.strides[0]), len(other.model.strides[0])]
        with pytest.raises(CheckpointError, match=f"holds a {dims[0]}D network, but this config's model is {dims[1]}D"):
            check_compatible(model / "best.ckpt", saved, classes, network, classes)


def test_slice_by_slice_prediction_is_a_plain_loop_over_slices():
    """`sliding_logits` of a 2D model (MONAI's SliceInferer) equals 2D sliding windows on each axial
    slice in turn, and the exported `SliceWise` network equals the network on each slice."""
    cfg = load_config(SMOKE_2D, ["eval.overlap=0.25", "eval.sw_batch_size=3"])
    torch.manual_seed(0)
    network = build_network(cfg.model, 1, 8).eval()
    volume = torch.randn(1, 1, 45, 37, 6)  # slices larger than the 32 × 32 window, in both directions
    with torch.no_grad():
        logits = sliding_logits(network, volume, cfg.eval)
        loop = torch.stack(
            [
                sliding_window_inference(
                    volume[..., z], list(cfg.eval.roi_size), 1, network, overlap=0.25, mode="gaussian"
                )
                for z in range(volume.shape[-1])
            ],
            dim=-1,
        )
        torch.testing.assert_close(
            logits, loop, rtol=1e-4, atol=1e-4
        )  # windows batched otherwise: float32 sums in another order
        window = volume[:, :, :32, :32]
        per_slice = torch.stack([network(window[..., z]) for z in range(6)], dim=-1)
        torch.testing.assert_close(
            SliceWise(network)(window), per_slice, rtol=1e-4, atol=1e-4
        )  # windows batched otherwise: float32 sums in another order
