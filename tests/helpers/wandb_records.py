"""Reading a W&B run back from its offline files, for the tests.

wandb 0.31 has no Python reader of a `.wandb` file (its internal datastore moved to wandb-core), so
`records` reads the log format it writes (LevelDB's: 32 KiB blocks of checksummed chunks) and
parses each record with wandb's own protobuf."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

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


def nested(items: Any) -> dict[str, Any]:
    """History or config items (flattened `nested_key` paths) as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(item.value_json)
    return out


def offline_run(output_dir: Path) -> Path:
    """The one offline W&B run folder of a run's output folder."""
    (run,) = (output_dir / "wandb").glob("offline-run-*")
    return run


def run_records(run: Path) -> list[wandb_internal_pb2.Record]:
    """An ended run's records, whole: the last is its exit record (`RunLogger.finish` waits for W&B's
    service to write it; `run.finish()` alone returns before the last records reach the file)."""
    (path,) = run.glob("run-*.wandb")
    found = list(records(path))
    assert found and found[-1].WhichOneof("record_type") == "exit", f"{path} ends before the run's exit record"
    return found


def history(run_records: list[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    """Each `wandb.log` call's values, in order."""
    return [nested(r.history.item) for r in run_records if r.WhichOneof("record_type") == "history"]
