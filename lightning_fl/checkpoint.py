"""Writing and reading files safely: atomic writes (a crash never leaves half a file), checked
checkpoint loads, and the check that a saved model fits the network it is loaded into. Which file
is which: `run_folder.py`.

torch is imported by the functions that need it: the command line checks its arguments and configs,
and the sweep plans its runs, before paying for torch's import."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lightning_fl.errors import UserInputError

if TYPE_CHECKING:
    import torch
    from torch import nn


class OutputError(UserInputError):
    """The run folder cannot be written (permissions, a full disk, a file where a folder should be)."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be read, or was made for another label space or network."""


class RunFolderError(UserInputError):
    """A run folder that another process is writing, or that holds files a new run would mix with."""


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`; on any
    failure the previous file is left as it was."""
    try:
        _atomic_write(path, write)
    except OSError as err:
        raise OutputError(
            f"cannot write {path}: {why_not_written(path.parent, err)}; any previous version of it is intact"
        ) from err


def why_not_written(folder: Path, err: OSError) -> str:
    """Why a folder could not be made or written in: a file where it or a folder above it should be
    (named, instead of the OS's "File exists" or "Not a directory"), else the OS's reason."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file, not a folder" if blocker else str(err.strerror or err)


def atomic_write_together(writes: Mapping[Path, Callable[[BinaryIO], Any]], move_old_aside: bool = False) -> None:
    """Files that belong together (an export's model and metadata, a sweep's tables): every one
    written to a temporary file first, then all renamed over their paths, so a write that fails
    (a full disk) leaves every previous version as it was, never one new file beside an old one.
    `move_old_aside`: the previous versions are kept beside them (`move_aside`), not replaced."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            try:
                staged.append((_stage(path, write), path))
            except OSError as err:
                raise OutputError(
                    f"cannot write {path}: {why_not_written(path.parent, err)}; no file of "
                    f"{', '.join(p.name for p in writes)} was replaced"
                ) from err
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        if move_old_aside and path.exists():
            print(f"moved the previous {path} aside to {move_aside(path)}")
        os.replace(tmp, path)


def _atomic_write(path: Path, write: Any) -> None:
    os.replace(_stage(path, write), path)


def _stage(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write(file)` on a temporary file beside `path`, flushed to disk; the temporary file's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))  # mkstemp's 0600 would make run files private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def first_nonfinite(tree: Any, name: str = "") -> str | None:
    """The name (`model.conv.weight`, `optimizers.0.state.3`) of the first floating tensor in `tree`
    (tensors in nested dicts, lists and tuples) that holds NaN or ±inf; None when all are finite."""
    import torch

    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return next(
        (bad for key, value in items if (bad := first_nonfinite(value, f"{name}.{key}" if name else str(key)))), None
    )


def check_finite(path: Path, tree: Any, writing: bool = False) -> None:
    """The gate every model file passes, read or written: a tensor holding NaN or ±inf is a broken
    model (a diverged run, a damaged file), refused with the file and the first bad tensor rather
    than used for predictions, scores or further training."""
    if bad := first_nonfinite(tree):
        action = "refusing to write" if writing else "refusing to use"
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values (a broken model); {action} it")


def save_model(path: Path, state: dict[str, torch.Tensor], **meta: Any) -> None:
    """`{"model": state_dict, **meta}` with tensors on the CPU, loadable with `weights_only=True`."""
    import torch

    payload = {"model": {k: v.detach().cpu() for k, v in state.items()}, **meta}
    check_finite(path, payload, writing=True)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The resumable state of a run; the previous file stays in place until the new one is complete."""
    import torch

    check_finite(path, state, writing=True)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_model(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents on the CPU (tensors only); a missing, damaged or broken (non-finite)
    file is a `CheckpointError`."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        first_line = next(iter(str(err).splitlines()), "")  # an empty file: EOFError without a message
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {first_line}") from err
    check_finite(path, payload)
    return payload


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` in one step: readers see the old file or the new one, never half of it."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def check_compatible(
    path: Path, saved: dict[str, torch.Tensor], saved_classes: list[str], model: nn.Module, classes: list[str]
) -> None:
    """Refuse, saying what differs, a checkpoint whose classes or network do not match this run."""
    if list(saved_classes) != list(classes):
        raise CheckpointError(f"{path} was made for the classes {list(saved_classes)}, this run has {list(classes)}")
    expected = model.state_dict()
    if dims := next(
        ((saved[k].dim() - 2, v.dim() - 2) for k, v in expected.items() if k in saved and saved[k].dim() != v.dim()),
        None,
    ):
        raise CheckpointError(
            f"{path} holds a {dims[0]}D network, but this config's model is {dims[1]}D (model.strides); "
            f"use a {dims[1]}D checkpoint or the config it was trained with"
        )
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    reshaped = [
        f"{k} {tuple(saved[k].shape)} ≠ {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        details = [
            f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(reshaped)} of another shape (e.g. {reshaped[0]})" if reshaped else "",
        ]
        raise CheckpointError(
            f"{path} holds another network than this run's model config: " + "; ".join(d for d in details if d)
        )


def move_aside(folder: Path) -> Path:
    """Rename `folder` (or a file) to `<name>.replaced-<date-time>` beside it and return where it
    went: what an `--overwrite` does with what it replaces, so that nothing of the user's is deleted."""
    folder = folder.absolute()  # `.` has no name to extend
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = folder.with_name(f"{folder.name}.replaced-{stamp}"), 1
    while aside.exists():  # replaced twice within a second
        n += 1
        aside = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    try:
        folder.rename(aside)
    except OSError as err:
        raise OutputError(f"cannot move {folder} aside to {aside}: {err.strerror or err}") from err
    return aside


def umask_mode(mode: int = 0o777) -> int:
    """`mode` as the user's umask lets a new file or folder have it (a folder made by
    tempfile.mkdtemp is 0700 whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def file_sha256(path: Path, size: int | None = None) -> str:
    """The sha256 of a file's first `size` bytes (all of it by default)."""
    with path.open("rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()
