"""Where a run's numbers go: `metrics.csv` (long format), Weights & Biases, and the console table.

Sites log their step metrics with `self.log_dict` as any LightningModule does; under Fabric these
reach `StepMeans`, which the round loop reads once per site and round. W&B runs offline unless the
config says otherwise (`wandb sync <run>/wandb/offline-run-*` uploads later); the metric names and
what each holds: docs/reference/outputs.md, "W&B".
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from lightning_fl.analysis import Overlay
from lightning_fl.checkpoint import OutputError
from lightning_fl.run_folder import CLIPPED, DROPPED, GLOBAL, LOCAL, METRICS_COLUMNS, TRAIN, VALIDATION, RunFolder

WANDB_PHASE = {VALIDATION: "val"}  # metrics.csv's phase → the W&B key's first part (others as they are)


class StepMeans(Logger):
    """A Fabric logger that averages every logged metric until `pop` is called.

    It exists so that a site logs with `self.log_dict` as any LightningModule does, while the round
    loop reads one mean per metric and round. It holds the running sums and counts.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    @property
    def name(self) -> str:
        return "step_means"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Add one step's metrics to the running means."""
        for key, value in metrics.items():
            self._sums[key] += float(value)
            self._counts[key] += 1

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is saved by the run itself

    def pop(self) -> dict[str, float]:
        """The mean of each metric since the last `pop`, and start over."""
        means = {key: self._sums[key] / self._counts[key] for key in self._sums}
        self._sums.clear()
        self._counts.clear()
        return means


class RunLogger:
    """Appends rows to a run folder's `metrics.csv` as they come (a crashed run keeps what it
    measured) and mirrors them to W&B with the round as the step."""

    def __init__(self, folder: RunFolder, cfg: DictConfig, resume: tuple[int, str | None] | None = None) -> None:
        """`resume` = (length of metrics.csv at the checkpoint, W&B run id): rows written after the
        checkpoint are cut, new ones appended, and the same W&B run continues. The file must hold
        those bytes (`RunFolder.check_same_run`): truncating a shorter one would pad it with NULs."""
        self.folder, self.path = folder, folder.metrics
        if resume is None:
            self._file = self.path.open("w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=METRICS_COLUMNS)
            self._csv.writeheader()
        else:
            self._file = self.path.open("r+", newline="")
            header = next(csv.reader([self._file.readline()]))  # a run begun by an older version keeps its columns
            self._file.truncate(resume[0])
            self._file.seek(resume[0])
            self._csv = csv.DictWriter(self._file, fieldnames=header, extrasaction="ignore")
        self._wandb = self._start_wandb(folder.path, cfg, resume[1] if resume else None)
        self._pending: dict[str, float] = {}

    @staticmethod
    def _start_wandb(output_dir: Path, cfg: DictConfig, run_id: str | None) -> Any:
        if cfg.logger.wandb.mode == "disabled":
            return None
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        settings = cfg.logger.wandb
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name,
            group=settings.group,
            job_type=settings.job_type,
            tags=list(settings.tags),
            notes=settings.notes,
            mode=settings.mode,
            dir=str(output_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
            id=run_id,
            resume="allow" if run_id else None,
        )
        run.define_metric("round")  # the x-axis of every chart, not W&B's own step
        run.define_metric("*", step_metric="round")
        run.define_metric("val/*", step_metric="round", summary="max")  # the best validated Dice
        return run

    @property
    def wandb_id(self) -> str | None:
        """The W&B run's id (kept in `state.ckpt` so a resumed run continues it); None without W&B."""
        return self._wandb.id if self._wandb is not None else None

    def position(self) -> int:
        """Bytes of metrics.csv written so far (flushed): where a resumed run continues."""
        self._flush()
        return self._file.tell()

    def _flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from err

    def train(self, round: int, site: str, means: Mapping[str, float]) -> None:
        """A site's mean training losses of one round."""
        self._write({"round": round, "phase": TRAIN, "site": site, "model": LOCAL} | dict(means))
        self._pending |= {f"train/{site}/{key}": value for key, value in means.items()}

    def dice(self, round: int, phase: str, site: str, model: str, dice: Mapping[str, float]) -> None:
        """A model's Dice per class on a site, in one phase (validation, test, external)."""
        for name, value in dice.items():
            self._write({"round": round, "phase": phase, "site": site, "model": model, "class": name, "dice": value})
            if not math.isnan(value):
                self._pending[f"{dice_prefix(phase, site, model)}/{name}"] = value

    def dropped(self, round: int, site: str, reason: str) -> None:
        """A site whose update this round was not aggregated, and why: on disk at once, since too
        few updates stop the run before the round is committed."""
        self._write({"round": round, "phase": DROPPED, "site": site, "model": LOCAL, "note": reason})
        self._flush()
        self._pending[f"dropped/{site}"] = 1.0

    def clipped(self, round: int, site: str, reason: str) -> None:
        """A site whose outlying update this round was scaled down to the bound before aggregation, and why."""
        self._write({"round": round, "phase": CLIPPED, "site": site, "model": LOCAL, "note": reason})
        self._pending[f"clipped/{site}"] = 1.0

    def scalars(self, values: Mapping[str, float]) -> None:
        """Values for W&B only (not metrics.csv), sent with the round's next `commit`."""
        self._pending |= dict(values)

    def overlays(self, overlays: Mapping[str, Overlay], class_labels: Mapping[int, str]) -> None:
        """Each site's validation slice with ground truth and prediction as W&B masks (`overlay/<site>`)."""
        if self._wandb is None:
            return
        import wandb

        labels = dict(class_labels)
        self._pending |= {
            f"overlay/{site}": wandb.Image(
                o.image,
                caption=f"{site}: first validation case",
                masks={
                    "ground_truth": {"mask_data": o.truth, "class_labels": labels},
                    "prediction": {"mask_data": o.prediction, "class_labels": labels},
                },
            )
            for site, o in overlays.items()
        }

    def table(self, key: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A W&B table sent with the next `commit` (not metrics.csv)."""
        if self._wandb is not None:
            import wandb

            self._pending[key] = wandb.Table(columns=list(header), data=[list(r) for r in rows])

    def commit(self, step: int, round: int) -> None:
        """Flush the CSV and send everything gathered to W&B in one step (increasing), shown at `round`."""
        self._flush()
        if self._wandb is not None and self._pending:
            self._wandb.log(self._pending | {"round": round}, step=step)
        self._pending = {}

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Close metrics.csv and end the W&B run with the run's summary and the run folder's record
        files (`RunFolder.RECORD`), which `analysis.download_wandb_runs` fetches back as a run folder.
        `wandb.teardown` then waits for W&B's service process to exit: `finish` returns before the
        service has written the run's last records (the test's Dice) to the offline `.wandb` file,
        which a `wandb sync` started at once would miss (the next run starts a new service)."""
        self._file.close()
        if self._wandb is not None:
            import wandb

            self._wandb.summary.update(dict(summary))
            for name in RunFolder.RECORD:
                if (self.folder.path / name).is_file():
                    self._wandb.save(str(self.folder.path / name), base_path=str(self.folder.path), policy="now")
            self._wandb.finish()
            wandb.teardown()

    def _write(self, row: dict[str, Any]) -> None:
        try:
            self._csv.writerow({key: _format(row.get(key)) for key in self._csv.fieldnames})
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from err


def dice_prefix(phase: str, site: str, model: str) -> str:
    """`val/<site>/dice` (the global model, or a standalone site's own); another site's model on
    this site: `test/<site>/model_<model>/dice`."""
    scope = site if model in (GLOBAL, site) else f"{site}/model_{model}"
    return f"{WANDB_PHASE.get(phase, phase)}/{scope}/dice"


def _format(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value
