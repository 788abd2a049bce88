"""Model and state files of a run: atomic writes, so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.ckpt"  # everything `fit --resume` needs, rewritten after every round


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make run files private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: Path, state: dict[str, torch.Tensor], **meta: Any) -> None:
    """`{"model": state_dict, **meta}` with tensors on the CPU, loadable with `weights_only=True`."""
    payload = {"model": {k: v.detach().cpu() for k, v in state.items()}, **meta}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The resumable state of a run; the previous file stays in place until the new one is complete."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_model(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
