"""Running a network on whole volumes, and a trained model outside training: loading, label maps
on each input's own grid, export.

A model file is either a run checkpoint (`best.ckpt`, `last.ckpt`: weights plus the run's resolved
config) or the TorchScript file `lightning-fl export` writes (`model.ts`, with the same config in
its `metadata.json`). Either way the config gives the preprocessing (RAS, spacing, HU window) and
the sliding window, so a prediction is made exactly as validation made it, then resampled back
to the input's grid: the output has the input's shape and affine whatever its orientation.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import monai
import monai.transforms as mt
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer, sliding_window_inference
from monai.networks.utils import convert_to_torchscript
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lightning_fl.checkpoint import (
    CheckpointError,
    OutputError,
    atomic_write_bytes,
    atomic_write_together,
    check_compatible,
    check_finite,
    load_model,
)
from lightning_fl.config import config_from_container, spatial_dims
from lightning_fl.data.datasets import nifti_stem
from lightning_fl.data.transforms import inference_transform
from lightning_fl.data.validation import check_image
from lightning_fl.distributed import check_accelerator, resolve_precision
from lightning_fl.errors import DatalistError
from lightning_fl.networks import SliceWise, build_network, memory_format
from lightning_fl.run_folder import FORMAT, RunFolder

TORCHSCRIPT_SUFFIX = ".ts"
METADATA = "metadata.json"
EXPORTED_MODEL = f"model{TORCHSCRIPT_SUFFIX}"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class Predictor:
    """A network as evaluation and inference run it: inputs on its device and in its memory
    format, float32 logits out, under the run's autocast precision."""

    def __init__(self, network: nn.Module, fabric: L.Fabric, model: DictConfig) -> None:
        self.network, self.fabric = network, fabric
        self.dims, self.memory_format = spatial_dims(model), memory_format(model)

    def prepare(self, image: Tensor) -> Tensor:
        """An input batch on the network's device, and in its memory format where it is the network's
        input (a 2D network's volumes are cut into slices first)."""
        image = image.to(self.fabric.device)
        return image.to(memory_format=self.memory_format) if image.dim() == self.dims + 2 else image

    def __call__(self, image: Tensor) -> Tensor:
        with self.fabric.autocast():
            return self.network(image).float()


def sliding_logits(model: Callable[[Tensor], Tensor], image: Tensor, eval_cfg: DictConfig) -> Tensor:
    """Logits `[B, C, *S]` of whole volumes `[B, 1, *S]`, by Gaussian-blended sliding windows: 3D
    windows, or for a 2D model (a 2D `eval.roi_size`) 2D windows on each axial slice."""
    settings = {"sw_batch_size": eval_cfg.sw_batch_size, "overlap": eval_cfg.overlap, "mode": eval_cfg.blend_mode}
    if len(eval_cfg.roi_size) == 2:
        return SliceInferer(roi_size=list(eval_cfg.roi_size), spatial_dim=2, progress=False, **settings)(image, model)
    return sliding_window_inference(image, roi_size=list(eval_cfg.roi_size), predictor=model, **settings)


@dataclass
class TrainedModel:
    """A model ready to predict, with the config it was trained and validated with."""

    name: str  # how tables and file names refer to it: "<run folder>/<file>"
    path: Path
    cfg: DictConfig
    predictor: Predictor
    precision: str  # what it runs at here (fabric.precision resolved on this machine)
    round: int | None  # the round it was saved after (numbered from 1), where known


def load_trained(path: Path, overrides: list[str] | None = None, accelerator: str | None = None) -> TrainedModel:
    """A checkpoint or an exported TorchScript model, on the device `fabric.accelerator` (or
    `accelerator`, which leaves the config as saved) picks. Overrides change how it runs
    (`eval.sw_batch_size=2`, `fabric.accelerator=cpu`, `data.root=...`), not what it is: the network
    and label space come from the file."""
    if path.suffix == TORCHSCRIPT_SUFFIX:
        extra = {METADATA: ""}
        network = _load_torchscript(path, extra)
        try:
            metadata = json.loads(extra[METADATA] or "{}")
        except ValueError as err:  # not UTF-8, not JSON
            raise CheckpointError(f"{path}: its {METADATA} is not valid JSON ({err}); export the model again") from err
        saved = metadata.get("lightning_fl") if isinstance(metadata, dict) else None
        if not isinstance(saved, dict) or "config" not in saved:
            raise CheckpointError(
                f"{path} has no {METADATA} from `lightning-fl export`: its preprocessing and classes are unknown"
            )
        if problem := _saved_problem(saved, ()):
            raise CheckpointError(f"{path}: its {METADATA} is not what `lightning-fl export` writes: {problem}")
        cfg = config_from_container(saved["config"], overrides, f"{path} ({METADATA})")
        saved_round = RunFolder.model_round(saved)
        if spatial_dims(cfg.model) == 2:  # exported as `SliceWise`, taking volumes; slices are cut here
            network = network.network
    else:
        payload = read_model_file(path)
        cfg = config_from_container(payload["config"], overrides, f"{path} (its config)")
        network = build_network(cfg.model, in_channels=1, out_channels=len(cfg.labels.classes))
        check_compatible(path, payload["model"], payload["classes"], network, list(cfg.labels.classes))
        network.load_state_dict(payload["model"])
        saved_round = RunFolder.model_round(payload)
    runtime = OmegaConf.merge(cfg.fabric, {"accelerator": accelerator or cfg.fabric.accelerator})
    check_accelerator(runtime.accelerator)
    precision = resolve_precision(runtime)
    fabric = L.Fabric(accelerator=runtime.accelerator, devices=1, precision=precision)
    network = network.eval().to(fabric.device)
    name = f"{path.resolve().parent.name}/{path.name}"
    return TrainedModel(name, path, cfg, Predictor(network, fabric, cfg.model), precision, saved_round)


def read_model_file(path: Path) -> dict[str, Any]:
    """A model file of a run (best.ckpt, last.ckpt), loaded and checked: finite weights, class names
    and the run's config, or a `CheckpointError` that says what is wrong with it."""
    payload = load_model(path)
    if problem := _saved_problem(payload, ("model", "classes")):
        models = f"{RunFolder.model_file('best')}, {RunFolder.model_file('last')}"
        raise CheckpointError(f"{path} is not a lightning-fl model checkpoint ({models}): {problem}")
    return payload


def _saved_problem(saved: Any, keys: tuple[str, ...]) -> str | None:
    """Why a loaded checkpoint (`keys`: "model", "classes") or export metadata is not what this
    project saves: a dict of the run's config, its round and, in a checkpoint, weights and class names."""
    if not isinstance(saved, dict):
        return f"it holds a {type(saved).__name__}, not a dict of weights, classes and the run's config"
    if "config" not in saved:
        return "it has no config"
    wrong = []
    if not isinstance(saved["config"], dict):
        wrong.append("its 'config' is not a mapping of config keys")
    if saved.get("round") is not None and type(saved["round"]) is not int:
        wrong.append("its 'round' is not a whole number")
    model, classes = saved.get("model"), saved.get("classes")
    if "model" in keys and not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
        wrong.append("its 'model' is not a dict of weight tensors")
    if "classes" in keys and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        wrong.append("its 'classes' is not a list of class names")
    return "; ".join(wrong) or None


def _load_torchscript(path: Path, extra: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # noqa: BLE001 - torch.jit.load raises many types for a damaged file
        raise CheckpointError(f"cannot read TorchScript model {path}: {str(err).splitlines()[0]}") from err
    check_finite(path, module.state_dict())
    return module


def nifti_inputs(source: Path) -> list[Path]:
    """A NIfTI file, or every NIfTI file in a folder (sorted)."""
    if source.is_dir():
        try:
            files = sorted(p for p in source.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        except OSError as err:
            raise DatalistError(f"--input {source}: cannot list the folder ({err.strerror or err})") from err
        if not files:
            raise DatalistError(f"--input {source}: no .nii or .nii.gz files in this folder")
        return files
    if not source.is_file():
        raise DatalistError(f"--input {source}: no such file or folder")
    if not source.name.endswith(NIFTI_SUFFIXES):
        raise DatalistError(f"--input {source}: expected a NIfTI file (.nii or .nii.gz) or a folder of them")
    return [source]


def output_files(source: Path, out_dir: Path, probabilities: bool) -> list[Path]:
    """What `infer_file` writes for `source`: `<stem>.nii.gz`, and `<stem>_probabilities.nii.gz`."""
    stem = nifti_stem(source)
    return [out_dir / f"{stem}.nii.gz", *([out_dir / f"{stem}_probabilities.nii.gz"] if probabilities else [])]


def check_output_names(inputs: list[Path], out_dir: Path, probabilities: bool) -> None:
    """Refuse inputs whose outputs would overwrite each other (`a.nii` and `a.nii.gz`; with
    probabilities, `a_probabilities.nii.gz` and `a`'s probability map), naming both inputs."""
    claimed: dict[Path, Path] = {}
    for source in inputs:
        for target in output_files(source, out_dir, probabilities):
            if target in claimed:
                raise DatalistError(
                    f"--input: {claimed[target]} and {source} would both be written to {target}; "
                    "rename one of them or infer them into separate folders"
                )
            claimed[target] = source


@torch.no_grad()
def infer_file(model: TrainedModel, source: Path, out_dir: Path, probabilities: bool = False) -> list[Path]:
    """Write `<stem>.nii.gz` (uint8 classes) and optionally `<stem>_probabilities.nii.gz` (float32,
    one volume per class in class order) on the grid of `source`; returns the files written. An
    input that fails the input checks (`validation.check_image`: not NIfTI, not 3D, a degenerate
    affine, NaN voxels) is refused before anything is written.

    The softmax probabilities are resampled to the input's grid (trilinear) and the classes are
    their argmax there, as nnU-Net does: smoother outlines than resampling the classes themselves,
    and the two files always agree."""
    header, problems, _ = check_image(source)
    if problems:
        raise DatalistError("; ".join(problems))  # each names the file
    transform = inference_transform(model.cfg.data)
    try:
        item = transform({"image": str(source)})
    except RuntimeError as err:  # MONAI wraps the reader's error
        raise DatalistError(f"{source}: cannot be read as an image: {err.__cause__ or err}") from err
    image: MetaTensor = item["image"]
    logits = sliding_logits(model.predictor, model.predictor.prepare(image.as_tensor()[None]), model.cfg.eval)[0]
    item["probabilities"] = MetaTensor(torch.softmax(logits, 0), meta=image.meta)
    native = mt.Invertd("probabilities", transform, orig_keys="image", nearest_interp=False)(item)["probabilities"]
    if tuple(native.shape[1:]) != header.shape:  # the inverse must land on the input's grid exactly
        raise RuntimeError(f"{source}: the prediction came back as {tuple(native.shape[1:])}, not {header.shape}")
    targets = output_files(source, out_dir, probabilities)
    written = [save_like(native.argmax(0).to(torch.uint8).cpu().numpy(), header, targets[0])]
    if probabilities:
        channel_last = native.as_subclass(torch.Tensor).movedim(0, -1).float().cpu().numpy()  # as NIfTI stores vectors
        written.append(save_like(channel_last, header, targets[1]))
    return written


def save_like(volume: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    """`volume` as a NIfTI file with `like`'s affine, qform, sform and units, written atomically."""
    out = nib.Nifti1Image(volume, like.affine, like.header.copy())
    out.set_data_dtype(volume.dtype)
    out.header.set_slope_inter(
        1, 0
    )  # CT headers often scale stored integers; classes and probabilities are stored as is
    for get, put in ((like.get_qform, out.set_qform), (like.get_sform, out.set_sform)):
        matrix, form_code = get(coded=True)
        put(matrix, int(form_code))
    data = out.to_bytes()
    atomic_write_bytes(path, lambda f: f.write(data if path.suffix == ".nii" else gzip.compress(data, compresslevel=1)))
    return path


def export_torchscript(model: TrainedModel, out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """`model.ts` (TorchScript, float32, with `metadata.json` inside as MONAI bundles keep it) and
    the same `metadata.json` beside it. The deep-supervision heads only train, so they are left out;
    a 2D network is wrapped to take volumes (`SliceWise`), so every exported model takes a volume.
    An export already in `out_dir` is refused, or with `overwrite` moved aside once the new one is
    ready (`out_dir` may hold anything else, even be `.`: only the export's two files move)."""
    ts_path, meta_path = out_dir / EXPORTED_MODEL, out_dir / METADATA
    held = [path.name for path in (ts_path, meta_path) if path.exists()]
    if held and not overwrite:
        raise OutputError(
            f"--output {out_dir} holds an export ({' and '.join(held)}); pass --overwrite to replace it (the old "
            "files are moved aside), or choose another --output"
        )
    cfg = model.cfg
    plain = OmegaConf.merge(cfg.model, {"deep_supervision_heads": 0})
    network = build_network(plain, in_channels=1, out_channels=len(cfg.labels.classes))
    state = {
        k: v
        for k, v in model.predictor.network.state_dict().items()
        if "deep_supervision_heads" not in k and "super_head" not in k
    }
    network.load_state_dict(state)
    network = network.eval().cpu()
    metadata = bundle_metadata(model)
    if spatial_dims(cfg.model) == 2:
        network, example = SliceWise(network), torch.randn(1, 1, *cfg.eval.roi_size, 3)  # any number of slices
    else:
        example = torch.randn(1, 1, *cfg.eval.roi_size).to(memory_format=memory_format(cfg.model))
    with warnings.catch_warnings():  # TorchScript's notes on MONAI's type annotations
        warnings.simplefilter("ignore", UserWarning)
        scripted = convert_to_torchscript(network, verify=True, inputs=[example], rtol=1e-4, atol=1e-4)
    atomic_write_together(
        {
            ts_path: lambda f: torch.jit.save(scripted, f, _extra_files={METADATA: json.dumps(metadata)}),
            meta_path: lambda f: f.write((json.dumps(metadata, indent=2) + "\n").encode()),
        },
        move_old_aside=True,
    )
    return ts_path, meta_path


def window_size(eval_cfg: DictConfig) -> list[int]:
    """The exported model's sliding window on a volume: `eval.roi_size`, or a 2D one's slice `[x, y, 1]`."""
    return [*eval_cfg.roi_size, 1] if len(eval_cfg.roi_size) == 2 else list(eval_cfg.roi_size)


def bundle_metadata(model: TrainedModel) -> dict[str, Any]:
    """MONAI-bundle-style metadata: what the network takes and returns, and how to prepare its input."""
    cfg = model.cfg
    classes = list(cfg.labels.classes)
    window = cfg.data.intensity
    shape: list[Any] = list(cfg.eval.roi_size) if len(cfg.eval.roi_size) == 3 else [*cfg.eval.roi_size, "*"]
    return {
        "version": "1.0.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": "lightning-fl ConDistFL abdominal CT segmentation",
        "task": f"segmentation of {', '.join(classes[1:])} in CT",
        "description": f"global model of a federated run, exported from {model.name}"
        + (f" (after round {model.round})" if model.round is not None else ""),
        "intended_use": "research only",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                    "orientation": "RAS",
                    "spacing_mm": list(cfg.data.spacing_mm),  # 0: the input's own spacing on that axis
                    "intensity_window": {
                        "hu_min": window.hu_min,
                        "hu_max": window.hu_max,
                        "center": window.center,
                        "scale": window.scale,
                        "formula": "(clip(HU, hu_min, hu_max) - center) / scale",
                    },
                    "value_range": [
                        (window.hu_min - window.center) / window.scale,
                        (window.hu_max - window.center) / window.scale,
                    ],
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(classes),
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": ["-inf", "inf"],
                    "is_patch_data": True,
                    "channel_def": {str(i): c for i, c in enumerate(classes)},
                    "activation": "logits: softmax over channels, argmax for labels",
                }
            },
        },
        "inference": {
            "sliding_window": {
                "roi_size": window_size(cfg.eval),
                "overlap": cfg.eval.overlap,
                "blend_mode": cfg.eval.blend_mode,
            }
        },
        "lightning_fl": {"format": FORMAT, "round": model.round, "config": OmegaConf.to_container(cfg, resolve=True)},
    }
