"""`evaluate`, `infer` and `export` on real checkpoints: a 1-round fit on datasets fabricated in the
MSD, KiTS19 and AMOS22 layouts, the smoke run's model on phantoms in LAS/LPS/RAS, and the real CT
volumes (the `realdata` fixture)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from layouts import make_amos, make_kits, make_msd

from lightning_fl.config import load_config
from lightning_fl.data.datasets import cached_dataset
from lightning_fl.data.prepare import prepare_task
from lightning_fl.data.transforms import evaluation_transform
from lightning_fl.labels import label_space_from_config


def read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def fabricated_run(cli, tmp_path_factory) -> Path:
    """Five published datasets → prepare-data → a 1-round fit, preprocessed cases cached on disk."""
    tmp = tmp_path_factory.mktemp("fabricated")
    cfg = load_config()
    labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
    data = tmp / "data"
    prepare_task("liver", make_msd(tmp / "Task03_Liver", "liver", 5, [1, 2]), data, labels)
    prepare_task("spleen", make_msd(tmp / "Task09_Spleen", "spleen", 5, [1]), data, labels)
    prepare_task("pancreas", make_msd(tmp / "Task07_Pancreas", "pancreas", 5, [1, 2]), data, labels)
    prepare_task("kidney", make_kits(tmp / "kits19", 5), data, labels)
    prepare_task("amos", make_amos(tmp / "amos22"), data, labels)
    result = cli(
        "fit",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        f"output_dir={tmp / 'run'}",
        f"data.root={data}",
        "data.synthetic=null",
        "data.external=[{name: amos, datalist: amos.json, classes: [liver, spleen, pancreas, kidney]}]",
        f"data.cache_dir={tmp / 'cache'}",
        "data.spacing_mm=[1.6,1.6,2.5]",
        "fl.rounds=1",
        "logger.wandb.mode=disabled",
    )  # 24³ patches: bf16 Conv3d on CPU breaks at 2³ at the deepest level
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def test_fit_on_fabricated_layouts_and_cross_site_evaluation_reproduce_its_scores(cli, fabricated_run):
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


def _evaluate_case(cli, checkpoint: Path, image: Path, label: Path, label_map: str, output: Path) -> dict:
    """`evaluate` of one image and its label read through `label_map`, as the test set named
    after `output` (its datalist is `output`.json): the evaluation.json it writes."""
    listing = output.with_suffix(".json")
    listing.write_text(json.dumps({"testing": [{"image": str(image), "label": str(label)}]}))
    result = cli(
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--datalist",
        str(listing),
        "--label-map",
        label_map,
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "evaluation.json").read_text())


@pytest.mark.slow
def test_label_maps_score_the_same_anatomy_alike_and_refuse_unknown_values(cli, tmp_path, smoke_run, data_home):
    """The same labels written with TotalSegmentator ids and with AMOS ids give the same per-organ
    Dice; a value the AMOS map does not list is an error that names the file."""
    image = sorted((data_home / "synthetic-smoke").rglob("external/images/*.nii.gz"))[0]
    assert (
        cli(
            "infer",
            "--checkpoint",
            str(smoke_run / "best.ckpt"),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "pred"),
        ).returncode
        == 0
    )
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
        report = _evaluate_case(cli, smoke_run / "best.ckpt", image, label, name, tmp_path / name)
        reports[name] = next(iter(report["models"].values()))
    ts, amos = (reports[n]["dice"][n] for n in schemes)
    assert list(ts) == ["liver", "spleen", "pancreas", "kidney"] and ts == amos
    present = [c for c, d in ts.items() if d is not None]
    assert present and all(ts[c] > 0.7 for c in present), ts  # its own prediction, resampled there and back (0.72–0.91)
    bad = tmp_path / "amos_bad.nii.gz"
    nib.save(nib.Nifti1Image(_encode(unified, schemes["amos"][0], 99), pred.affine), bad)
    (tmp_path / "bad.json").write_text(json.dumps({"testing": [{"image": str(image), "label": str(bad)}]}))
    result = cli(
        "evaluate",
        "--checkpoint",
        str(smoke_run / "best.ckpt"),
        "--datalist",
        str(tmp_path / "bad.json"),
        "--label-map",
        "amos",
        "--output",
        str(tmp_path / "bad"),
    )
    assert (
        result.returncode == 2
        and f"{bad} has label values [99] that the label map 'amos' does not list" in result.stderr
    )


@pytest.fixture(scope="module")
def oriented_inputs(tmp_path_factory, smoke_run, data_home) -> Path:
    """One phantom written in RAS (float32), LAS (int16) and LPS (int32), on anisotropic grids."""
    folder = tmp_path_factory.mktemp("oriented")
    source = nib.load(sorted((data_home / "synthetic-smoke").rglob("external/images/*.nii.gz"))[0])
    ras = nib.as_closest_canonical(source)
    hu = np.asanyarray(ras.dataobj).astype(np.float32)
    for axcodes, dtype in ((("R", "A", "S"), np.float32), (("L", "A", "S"), np.int16), (("L", "P", "S"), np.int32)):
        image = nib.Nifti1Image(hu.astype(dtype), ras.affine).as_reoriented(
            nib.orientations.ornt_transform(
                nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(axcodes)
            )
        )
        nib.save(image, folder / f"phantom_{''.join(axcodes)}.nii.gz")
    return folder


@pytest.mark.slow
def test_infer_writes_each_input_grid_whatever_its_orientation(cli, tmp_path, smoke_run, oriented_inputs):
    result = cli(
        "infer",
        "--checkpoint",
        str(smoke_run / "best.ckpt"),
        "--input",
        str(oriented_inputs),
        "--output",
        str(tmp_path),
        "--probabilities",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    canonical = {}
    for source in sorted(oriented_inputs.iterdir()):
        stem = source.name.removesuffix(".nii.gz")
        image, labels, probs = (
            nib.load(p) for p in (source, tmp_path / f"{stem}.nii.gz", tmp_path / f"{stem}_probabilities.nii.gz")
        )
        assert labels.shape == image.shape and np.array_equal(labels.affine, image.affine)
        assert nib.aff2axcodes(labels.affine) == tuple(stem.split("_")[1])
        assert labels.get_data_dtype() == np.uint8 and probs.shape == image.shape + (8,)
        p = np.asanyarray(probs.dataobj)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        assert (p.argmax(-1) == np.asanyarray(labels.dataobj)).mean() > 0.9999  # the classes are their argmax
        canonical[stem] = np.asanyarray(nib.as_closest_canonical(labels).dataobj)
    first, *others = canonical.values()
    assert len(np.unique(first)) >= 3 and all((first == o).mean() > 0.999 for o in others)  # one anatomy, three headers


@pytest.mark.slow
def test_exported_torchscript_predicts_what_the_checkpoint_predicts(cli, tmp_path, smoke_run, oriented_inputs):
    assert (
        cli("export", "--checkpoint", str(smoke_run / "best.ckpt"), "--output", str(tmp_path / "export")).returncode
        == 0
    )
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    image_format = metadata["network_data_format"]["inputs"]["image"]
    assert image_format["spacing_mm"] == [8.0, 8.0, 8.0] and image_format["intensity_window"]["hu_min"] == -54.0
    assert list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values())[:2] == [
        "background",
        "liver",
    ]
    source = oriented_inputs / "phantom_LPS.nii.gz"
    for model, out in ((smoke_run / "best.ckpt", "ckpt"), (tmp_path / "export" / "model.ts", "ts")):
        result = cli("infer", "--checkpoint", str(model), "--input", str(source), "--output", str(tmp_path / out))
        assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(read(tmp_path / "ckpt" / "phantom_LPS.nii.gz"), read(tmp_path / "ts" / "phantom_LPS.nii.gz"))


@pytest.mark.slow
def test_infer_and_evaluate_errors_name_what_is_wrong(cli, tmp_path, smoke_run, oriented_inputs):
    ckpt = str(smoke_run / "best.ckpt")
    cases = [
        (
            ["infer", "--checkpoint", ckpt, "--input", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path)],
            "no such file or folder",
        ),
        (
            ["infer", "--checkpoint", ckpt, "--input", str(oriented_inputs), "--output", str(oriented_inputs)],
            "holds the inputs",
        ),
        (
            [
                "infer",
                "--checkpoint",
                str(smoke_run / "state.ckpt"),
                "--input",
                str(oriented_inputs),
                "--output",
                str(tmp_path),
            ],
            "it has no config",
        ),
        (
            ["evaluate", "--checkpoint", ckpt, "--datalist", str(tmp_path / "x.json"), "--label-map", "lung"],
            "unknown task 'lung'",
        ),
        (["evaluate", "--checkpoint", ckpt], "give either --datalist FILE"),
    ]
    foreign = tmp_path / "foreign.ts"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 8, 1)), str(foreign))
    cases.append(
        (
            ["infer", "--checkpoint", str(foreign), "--input", str(oriented_inputs), "--output", str(tmp_path)],
            "has no metadata.json from `lightning-fl export`",
        )
    )
    if not torch.cuda.is_available():
        cases.append(
            (
                [
                    "infer",
                    "--checkpoint",
                    ckpt,
                    "--input",
                    str(oriented_inputs),
                    "--output",
                    str(tmp_path / "g"),
                    "fabric.accelerator=gpu",
                ],
                "PyTorch sees no CUDA GPU here",
            )
        )
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), four_d)
    cases.append(
        (
            ["infer", "--checkpoint", ckpt, "--input", str(four_d), "--output", str(tmp_path / "o")],
            f"image is not a 3D volume: shape (8, 8, 8, 2): {four_d}",
        )
    )
    (tmp_path / "x.json").write_text(json.dumps({"testing": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-2000:])


def _tiny_ct(path: Path, seed: int, nan: bool = False) -> Path:
    voxels = np.random.default_rng(seed).normal(40, 80, (16, 16, 16)).astype(np.float32)
    if nan:
        voxels[2, 3, 4] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, np.diag([6.0, 6.0, 6.0, 1.0])), path)
    return path


def test_infer_refuses_inputs_whose_outputs_collide(tmp_path, smoke_run, capsys):
    """`a.nii` and `a.nii.gz` would both become `a.nii.gz`; `a_probabilities.nii.gz`'s label map
    would be `a`'s probability map: refused before anything is written, naming both inputs."""
    from lightning_fl.cli import main

    ckpt = str(smoke_run / "best.ckpt")
    folder = tmp_path / "same_stem"
    first, second = _tiny_ct(folder / "a.nii", 0), _tiny_ct(folder / "a.nii.gz", 1)
    assert main(["infer", "--checkpoint", ckpt, "--input", str(folder), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{first} and {second} would both be written to {tmp_path / 'out' / 'a.nii.gz'}" in error
    folder = tmp_path / "probabilities"
    first, second = _tiny_ct(folder / "b.nii.gz", 0), _tiny_ct(folder / "b_probabilities.nii.gz", 1)
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                ckpt,
                "--input",
                str(folder),
                "--output",
                str(tmp_path / "out"),
                "--probabilities",
            ]
        )
        == 2
    )
    assert f"{first} and {second} would both be written to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (
        main(["infer", "--checkpoint", ckpt, "--input", str(folder), "--output", str(tmp_path / "out")]) == 0
    )  # no clash
    assert capsys.readouterr().out.strip() == f"wrote 2 label maps to {tmp_path / 'out'}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.nii.gz", "b_probabilities.nii.gz"]


def test_infer_skips_a_bad_input_goes_on_and_says_what_it_wrote(tmp_path, smoke_run, capsys):
    from lightning_fl.cli import main

    folder = tmp_path / "inputs"
    good = [_tiny_ct(folder / "case_0.nii.gz", 0), _tiny_ct(folder / "case_2.nii.gz", 2)]
    bad = _tiny_ct(folder / "case_1.nii.gz", 1, nan=True)
    out = tmp_path / "out"
    status = main(
        [
            "infer",
            "--checkpoint",
            str(smoke_run / "best.ckpt"),
            "--input",
            str(folder),
            "--output",
            str(out),
            "--probabilities",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.err
    assert captured.err.splitlines() == [
        f"lightning-fl infer: skipped case_1.nii.gz: image has 1 NaN or infinite voxels: {bad}",
        "lightning-fl infer: error: skipped 1 of 3 inputs: case_1.nii.gz",
    ]
    assert captured.out.strip() == f"wrote 2 label maps and 2 probability maps to {out}"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        n for p in good for n in (p.name, p.name.replace(".nii", "_probabilities.nii"))
    )
    for source in good:
        assert nib.load(out / source.name).shape == (16, 16, 16)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_infer_keeps_its_grid_and_scores_against_totalsegmentator(cli, realdata, tmp_path, smoke_run):
    ct, reference = realdata / "ts_example_ct.nii.gz", realdata / "ts_example_ct_pred_total_fast.nii.gz"
    result = cli("infer", "--checkpoint", str(smoke_run / "best.ckpt"), "--input", str(ct), "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    source, labels = nib.load(ct), nib.load(tmp_path / "ts_example_ct.nii.gz")
    assert labels.shape == source.shape == (122, 101, 112) and np.array_equal(labels.affine, source.affine)
    assert np.array_equal(labels.get_qform(), source.get_qform()) and np.array_equal(
        labels.get_sform(), source.get_sform()
    )
    report = _evaluate_case(cli, smoke_run / "best.ckpt", ct, reference, "totalsegmentator", tmp_path / "ts")
    dice = next(iter(report["models"].values()))["dice"]["ts"]
    assert list(dice) == ["liver", "spleen", "pancreas", "kidney"]  # every organ is in the reference
    assert all(0.0 <= d <= 1.0 for d in dice.values()) and report["test_sets"]["ts"]["per_organ"]
