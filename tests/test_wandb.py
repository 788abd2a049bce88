"""The W&B run of a fit, read back from its offline files: the metric names, `round` as their step,
the per-class table, the mask overlays and the bytes each round sends.

wandb 0.31 has no Python reader of a `.wandb` file (its internal datastore moved to wandb-core), so
`records` reads the log format it writes (LevelDB's: 32 KiB blocks of checksummed chunks) and
parses each record with wandb's own protobuf."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from wandb.proto import wandb_internal_pb2

from lightning_fl.config import load_config
from lightning_fl.labels import label_space_from_config

BLOCK, CHUNK_HEADER = 32768, 7
FULL, LAST = 1, 4  # chunk types that end a record


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a `.wandb` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = CHUNK_HEADER, b""  # the file's own header is as long as a chunk's
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if left < CHUNK_HEADER or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        parts += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _nested(items: Any) -> dict[str, Any]:
    """History or config items (flattened `nested_key` paths) as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(item.value_json)
    return out


@pytest.fixture(scope="module")
def wandb_run(cli, data_home, smoke_config_path, tmp_path_factory) -> Path:
    """A smoke fit that logs W&B offline, with a mask overlay every round."""
    out = tmp_path_factory.mktemp("wandb_run")
    result = cli(
        "fit",
        "--config",
        str(smoke_config_path),
        f"output_dir={out}",
        "logger.wandb.mode=offline",
        "logger.wandb.image_every=1",
        "logger.wandb.group=g",
        "logger.wandb.job_type=variant",
        "logger.wandb.tags=[demo]",
        "logger.wandb.notes=a note",
        data_home=data_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (out / "wandb").glob("offline-run-*")
    return run


@pytest.fixture(scope="module")
def run_records(wandb_run: Path) -> list[wandb_internal_pb2.Record]:
    (path,) = wandb_run.glob("run-*.wandb")
    return list(records(path))


def _history(run_records: list[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    return [_nested(r.history.item) for r in run_records if r.WhichOneof("record_type") == "history"]


def test_run_identity_and_config(run_records):
    (run,) = [r.run for r in run_records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.job_type, list(run.tags), run.notes) == (
        "lightning-fl",
        "g",
        "variant",
        ["demo"],
        "a note",
    )
    config = _nested(i for r in run_records if r.WhichOneof("record_type") == "config" for i in r.config.update)
    assert config["fl"]["rounds"] == 2 and config["logger"]["wandb"]["image_every"] == 1  # the resolved config


def test_metrics_are_named_by_phase_site_and_class_with_round_as_step(run_records):
    metrics = [r.metric for r in run_records if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "round" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "round" for m in metrics)
    (val,) = [m for m in metrics if m.glob_name == "val/*"]
    assert val.step_metric == "round" and val.summary.max  # the best validation Dice in the summary

    rows = _history(run_records)
    assert [row["round"] for row in rows] == [0, 1, 2]  # two rounds, then the test scores
    for row in rows[:2]:
        assert {"val/liver/dice/liver", "val/kidney/dice/kidney_tumor", "val/mean_dice"} <= row.keys()
        assert {"train/liver/loss", "train/spleen/condist", "train/pancreas/supervised"} <= row.keys()
        assert row["comm/bytes_sent"] == row["comm/bytes_received"] > 0  # 4 models out, 4 Δs of their size back
    final = rows[2]
    assert {"test/dice/liver", "test/liver/dice/liver", "external/external/dice/liver"} <= final.keys()
    assert "external/unenhanced/dice/kidney" in final
    assert not any(k.startswith("validation/") for row in rows for k in row)


def test_per_class_table(run_records, wandb_run, smoke_config_path):
    (table,) = [row["test/per_class"] for row in _history(run_records) if "test/per_class" in row]
    assert table["_type"] == "table-file"
    content = json.loads((wandb_run / "files" / table["path"]).read_text())
    assert content["columns"] == ["class", "test Dice", "external Dice", "unenhanced Dice"]
    cfg = load_config(smoke_config_path, ["output_dir=unused"])
    classes = list(label_space_from_config(cfg.labels.classes, cfg.labels.tumors).classes)
    assert [row[0] for row in content["data"]] == classes[1:] + ["mean"]
    summary = json.loads((wandb_run.parent.parent / "summary.json").read_text())
    assert [row[1] for row in content["data"][:-1]] == list(summary["test_dice"].values())  # null: no case


def test_mask_overlays_with_class_labels(run_records, wandb_run, smoke_config_path):
    cfg = load_config(smoke_config_path, ["output_dir=unused"])
    classes = label_space_from_config(cfg.labels.classes, cfg.labels.tumors).classes
    rows = _history(run_records)
    for row in rows[:2]:  # image_every=1: every round, each site's first validation case
        assert {f"overlay/{s.name}" for s in cfg.data.sites} <= row.keys()
    image = rows[0]["overlay/liver"]
    assert image["_type"] == "image-file" and set(image["masks"]) == {"ground_truth", "prediction"}
    truth = Image.open(wandb_run / "files" / image["masks"]["ground_truth"]["path"])
    picture = Image.open(wandb_run / "files" / image["path"])
    assert truth.size == picture.size and truth.getextrema()[1] > 0  # the slice shows the liver
    config = _nested(i for r in run_records if r.WhichOneof("record_type") == "config" for i in r.config.update)
    labels = config["_wandb"]["mask/class_labels"]
    for mask in ("ground_truth", "prediction"):
        entry = labels[f"overlay/liver_wandb_delimeter_{mask}"]["value"]
        assert entry == {str(i): name for i, name in enumerate(classes)}
