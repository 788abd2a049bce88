"""Where a run's numbers go: the W&B run of a fit, read back from its offline files
(tests/helpers/wandb_records.py): the metric names, `round` as their x-axis, the per-class table,
the mask overlays, the bytes each round sends, and the run folder's record files that a notebook
downloads again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from wandb.proto import wandb_internal_pb2

from lightning_fl import analysis
from lightning_fl.config import load_config
from lightning_fl.labels import LabelSpace
from lightning_fl.run_folder import RunFolder
from tests.helpers.wandb_records import history, nested, offline_run
from tests.helpers.wandb_records import run_records as read_run


@pytest.fixture(scope="module")
def wandb_run(smoke_run) -> Path:
    """The session's smoke fit: W&B offline, with a mask overlay every round."""
    return offline_run(smoke_run)


@pytest.fixture(scope="module")
def run_records(wandb_run: Path) -> list[wandb_internal_pb2.Record]:
    return read_run(wandb_run)


def test_run_identity_and_config(run_records):
    (run,) = [r.run for r in run_records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.job_type, list(run.tags), run.notes) == (
        "lightning-fl",
        "g",
        "variant",
        ["demo"],
        "a note",
    )
    config = nested(i for r in run_records if r.WhichOneof("record_type") == "config" for i in r.config.update)
    assert config["fl"]["rounds"] == 2 and config["logger"]["wandb"]["image_every"] == 1  # the resolved config


def test_metrics_are_named_by_phase_site_and_class_with_round_as_step(run_records):
    metrics = [r.metric for r in run_records if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "round" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "round" for m in metrics)
    (val,) = [m for m in metrics if m.glob_name == "val/*"]
    assert val.step_metric == "round" and val.summary.max  # the best validation Dice in the summary

    rows = history(run_records)
    assert [row["round"] for row in rows] == [1, 2, 2]  # two rounds, then the test scores after the last
    for row in rows[:2]:
        assert {"val/liver/dice/liver", "val/kidney/dice/kidney_tumor", "val/mean_dice"} <= row.keys()
        assert {"train/liver/loss", "train/spleen/condist", "train/pancreas/supervised"} <= row.keys()
        assert row["comm/bytes_sent"] == row["comm/bytes_received"] > 0  # 4 models out, 4 Δs of their size back
    final = rows[2]
    assert {"test/dice/liver", "test/liver/dice/liver", "external/external/dice/liver"} <= final.keys()
    assert "external/unenhanced/dice/kidney" in final
    assert not any(k.startswith("validation/") for row in rows for k in row)


def test_per_class_table(run_records, wandb_run, smoke_config_path):
    (table,) = [row["test/per_class"] for row in history(run_records) if "test/per_class" in row]
    assert table["_type"] == "table-file"
    content = json.loads((wandb_run / "files" / table["path"]).read_text())
    assert content["columns"] == ["class", "test Dice", "external Dice", "unenhanced Dice"]
    cfg = load_config(smoke_config_path, ["output_dir=unused"])
    classes = list(LabelSpace.of(cfg.labels).classes)
    assert [row[0] for row in content["data"]] == classes[1:] + ["mean"]
    summary = json.loads((wandb_run.parent.parent / "summary.json").read_text())
    assert [row[1] for row in content["data"][:-1]] == list(summary["test_dice"].values())  # null: no case


def test_mask_overlays_with_class_labels(run_records, wandb_run, smoke_config_path):
    cfg = load_config(smoke_config_path, ["output_dir=unused"])
    classes = LabelSpace.of(cfg.labels).classes
    rows = history(run_records)
    for row in rows[:2]:  # image_every=1: every round, each site's first validation case
        assert {f"overlay/{s.name}" for s in cfg.data.sites} <= row.keys()
    image = rows[0]["overlay/liver"]
    assert image["_type"] == "image-file" and set(image["masks"]) == {"ground_truth", "prediction"}
    truth = Image.open(wandb_run / "files" / image["masks"]["ground_truth"]["path"])
    picture = Image.open(wandb_run / "files" / image["path"])
    assert truth.size == picture.size and truth.getextrema()[1] > 0  # the slice shows the liver
    config = nested(i for r in run_records if r.WhichOneof("record_type") == "config" for i in r.config.update)
    labels = config["_wandb"]["mask/class_labels"]
    for mask in ("ground_truth", "prediction"):
        entry = labels[f"overlay/liver_wandb_delimeter_{mask}"]["value"]
        assert entry == {str(i): name for i, name in enumerate(classes)}


class _SyncedRun:
    """What `wandb.Api().runs(...)` yields for a run once `wandb sync` uploaded it: its id, name and
    files, here served from the offline run's `files/` folder that the upload sends."""

    def __init__(self, offline: Path) -> None:
        self.id, self.name, self._files = offline.name.rsplit("-", 1)[-1], "smoke", offline / "files"

    def files(self, names: list[str]) -> list[_SyncedFile]:
        return [_SyncedFile(self._files / n) for n in names if (self._files / n).exists()]


class _SyncedFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def download(self, root: str, replace: bool, exist_ok: bool) -> None:
        assert replace and exist_ok  # a second download of the same runs overwrites
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, Path(root) / self.path.name)


class _Api:
    def __init__(self, offline: Path) -> None:
        self.offline, self.asked = offline, []

    def runs(self, path: str, filters: dict | None) -> list[_SyncedRun]:
        self.asked.append((path, filters))
        return [_SyncedRun(self.offline)]


def test_the_run_record_travels_with_the_wandb_run_and_loads_back(wandb_run, tmp_path):
    """The W&B API itself needs network and an account: not tested here. What it would serve is:
    the run folder's record files, saved into the W&B run, which load as the folder itself does."""
    folder = RunFolder(wandb_run.parent.parent)
    for name in RunFolder.RECORD:
        saved = wandb_run / "files" / name
        assert saved.read_bytes() == (folder.path / name).read_bytes(), name
    api = _Api(wandb_run)
    (downloaded,) = analysis.download_wandb_runs("me/lightning-fl", tmp_path, group="g", api=api)
    assert api.asked == [("me/lightning-fl", {"group": "g"})]
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(RunFolder.RECORD)
    copy = RunFolder(downloaded)
    assert copy.read_metrics() == folder.read_metrics() and copy.read_summary() == folder.read_summary()
    assert copy.read_cases() == folder.read_cases() and copy.read_config() == folder.read_config()


@pytest.mark.parametrize(
    "method, keys",
    [
        (
            "standalone",  # one model per site: named in the keys where it scores another site
            {"train/liver/loss", "val/liver/dice/liver", "val/liver/mean_dice", "test/liver/dice/liver"}
            | {"test/spleen/model_liver/dice/spleen", "external/external/model_kidney/dice/kidney"},
        ),
        (
            "centralized",  # one pooled client, one model scored on every site
            {"train/pooled/loss", "val/liver/dice/liver", "val/mean_dice", "test/dice/kidney"}
            | {"external/external/dice/liver"},
        ),
    ],
)
def test_standalone_and_centralized_runs_name_their_clients_and_models(request, method, keys):
    run = request.getfixturevalue(f"{method}_run")
    logged = {key for row in history(read_run(offline_run(run.folder))) for key in row}
    assert keys <= logged, sorted(keys - logged)
    assert not any(key.startswith("val/global") or "/model_global/" in key for key in logged)
