"""`infer` and `export` on the smoke run's model: label maps on each input's own grid whatever its
orientation, TorchScript that predicts what the checkpoint predicts, and every error naming what
is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_fl.cli import main
from tests.helpers.cli import refused, run_main


def read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def oriented_inputs(tmp_path_factory, data_home) -> Path:
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
    """`infer` as a shell runs it (exit status 0, what it prints)."""
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
    assert result.stdout.strip().endswith(f"wrote 3 label maps and 3 probability maps to {tmp_path}")
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
def test_exported_torchscript_predicts_what_the_checkpoint_predicts(cli, capsys, tmp_path, smoke_run, oriented_inputs):
    """`export` as a shell runs it (exit status 0); the two models' label maps in this process."""
    export = cli("export", "--checkpoint", str(smoke_run / "best.ckpt"), "--output", str(tmp_path / "export"))
    assert export.returncode == 0 and export.stdout.startswith("wrote "), export.stderr[-3000:]
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    image_format = metadata["network_data_format"]["inputs"]["image"]
    assert image_format["spacing_mm"] == [8.0, 8.0, 8.0] and image_format["intensity_window"]["hu_min"] == -54.0
    assert list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values())[:2] == [
        "background",
        "liver",
    ]
    source = oriented_inputs / "phantom_LPS.nii.gz"
    assert metadata["lightning_fl"]["round"] == torch.load(smoke_run / "best.ckpt", weights_only=True)["round"]
    for model, out in ((smoke_run / "best.ckpt", "ckpt"), (tmp_path / "export" / "model.ts", "ts")):
        status, _, err = run_main(capsys, "infer", "--checkpoint", model, "--input", source, "--output", tmp_path / out)
        assert status == 0, err[-3000:]
    assert np.array_equal(read(tmp_path / "ckpt" / "phantom_LPS.nii.gz"), read(tmp_path / "ts" / "phantom_LPS.nii.gz"))


def test_infer_and_evaluate_errors_name_what_is_wrong(cli, capsys, tmp_path, smoke_run, oriented_inputs):
    """Each refused in one line naming what is wrong (in this process); the first also as a shell
    sees it: exit status 2, that line alone on stderr, no traceback."""
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
        assert message in refused(capsys, *args), args
    args, message = cases[0]
    result = cli(*args)
    assert result.returncode == 2 and result.stderr == f"lightning-fl infer: error: --input {args[4]}: {message}\n"


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
