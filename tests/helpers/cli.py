"""The command line as the tests run it: in this process (`run_main`: exit status and stderr, no
import cost) or as a subprocess (`Cli`: a real process, for exit statuses and tracebacks the way a
shell sees them, signals, and runs that need their own threads or ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fl.cli import main

REPO = Path(__file__).resolve().parent.parent.parent


def run_main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """`lightning-fl ARGS` in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def refused(capsys: pytest.CaptureFixture, *args: object) -> str:
    """The one error line of a command that must be refused: exit 2, `lightning-fl CMD: error: ...`, no traceback."""
    status, _, err = run_main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"lightning-fl {args[0]}: error: "), err
    return lines[0]


class Cli:
    """Runs `python -m lightning_fl ...` (or any Python command line) in a subprocess from the repo root.

    The subprocess inherits this process's environment (W&B offline and LIGHTNING_FL_DATA, set by
    the session's fixtures) as a shell would give it, without the address of a W&B service this
    process started: connected to it, a run resumed right after a killed one found the killed one's
    run id still held there and failed ("run ID ... is in use"). `env` adds to it for that one command.
    """

    def __call__(self, *args: str, timeout: float | None = None, **env: str) -> subprocess.CompletedProcess:
        """`lightning-fl *args`, waited for; its output captured as text."""
        return self.python("-m", "lightning_fl", *args, timeout=timeout, **env)

    def fit_smoke(self, out: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
        """`lightning-fl fit` of configs/smoke.yaml into `out` with `overrides`, which must succeed."""
        result = self("fit", "--config", "configs/smoke.yaml", f"output_dir={out}", *overrides, **env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def python(
        self, *args: object, cwd: Path = REPO, timeout: float | None = None, **env: str
    ) -> subprocess.CompletedProcess:
        """`python *args` (a script and its arguments), waited for; its output captured as text."""
        return subprocess.run(
            [sys.executable, *map(str, args)],
            check=False,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=_environment(env),
            timeout=timeout,
        )

    def start(self, *args: str, capture: bool = True, **env: str) -> subprocess.Popen:
        """`lightning-fl *args` started in its own session (so `os.killpg` reaches every rank), not
        waited for; its output piped as text when `capture`, else discarded."""
        output = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_fl", *args],
            cwd=REPO,
            text=True,
            env=_environment(env),
            start_new_session=True,
            stdout=output,
            stderr=output,
        )


def _environment(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its W&B service's address, plus `env`."""
    return {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"} | env
