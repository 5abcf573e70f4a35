"""Read an offline W&B run file (``run-<id>.wandb``) back: what a run logged, for tests and for scripts that draw it.

W&B has no public API for offline runs (the datastore reader moved into the Go core in wandb 0.19+), so this
small reader decodes the file itself: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks
of LevelDB-log records (4-byte CRC, 2-byte length, 1-byte type FULL/FIRST/MIDDLE/LAST) whose payloads are
``wandb_internal_pb2.Record`` protobufs.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, List

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path) -> List[Any]:
    """Every ``Record`` protobuf of the run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path) -> List[Dict[str, Any]]:
    """The logged history rows: [{key: decoded JSON value}] (media entries are their JSON descriptors)."""
    rows = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({_key(it): json.loads(it.value_json) for it in r.history.item})
    return rows


def summary(path) -> Dict[str, Any]:
    """The run summary: the last value of every key set through ``run.summary`` or history."""
    out: Dict[str, Any] = {}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "summary":
            for it in r.summary.update:
                out[_key(it)] = json.loads(it.value_json)
        elif kind == "history":
            for it in r.history.item:
                if not _key(it).startswith("_"):
                    out[_key(it)] = json.loads(it.value_json)
    return out


def config(path) -> Dict[str, Any]:
    """The run config: {key: value} (W&B stores each top-level key as {"value": ...})."""
    out: Dict[str, Any] = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "config":
            for it in r.config.update:
                value = json.loads(it.value_json)
                out[_key(it)] = value.get("value", value) if isinstance(value, dict) else value
    return out


def run_file(run_dir, timeout: float = 30.0) -> Path:
    """The ``run-*.wandb`` file of an offline run directory (``.../wandb/offline-run-*``), once complete.

    ``run.finish()`` can return before W&B's core process has written the last records, so this waits
    (up to ``timeout`` seconds) until the file holds the run's ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(Path(run_dir).glob("run-*.wandb"))
        if found:
            try:
                if any(r.WhichOneof("record_type") == "exit" for r in read_records(found[-1])):
                    return found[-1]
            except Exception:  # a record still being written: read again
                pass
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{run_dir}: no complete run-*.wandb file after {timeout:.0f} s")
        time.sleep(0.2)


def logged_tables(path, key: str) -> List[Dict[str, Any]]:
    """Every ``wandb.Table`` logged under ``key``, in order, with its media: [{"columns", "data", "column_types",
    "files": {artifact path: local file}}].

    W&B logs a table as a ``run_table`` artifact (``run-<id>-<key>``): the table JSON (``<key>.table.json``) and its
    images, masks and class sets. The run file's artifact record lists each entry's local copy (offline: under
    ``$WANDB_DATA_DIR/artifacts/staging``); an image cell is ``{"_type": "image-file", "path", "masks": {layer:
    {"path"}}, "classes": {"path"}}`` with paths into ``files``. The run's own ``files/media/table/`` copy has only
    the type names of media cells, hence this reader.
    """
    out = []
    for r in read_records(path):
        if r.WhichOneof("record_type") != "artifact" or r.artifact.type != "run_table":
            continue
        files = {e.path: e.local_path for e in r.artifact.manifest.contents}
        entry = files.get(f"{key}.table.json")
        if entry is not None:
            table = json.loads(Path(entry).read_text())
            out.append({**table, "files": files})
    return out
