"""Read an offline W&B run back from its `run-<id>.wandb` file, as `wandb sync` would upload it.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
with a 7-byte header (CRC32 4, length 2, type 1: full / first / middle / last) and a piece of a serialized
`wandb_internal_pb2.Record`. Parsing it needs only the protobuf classes that ship with the wandb package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # file header and chunk header are both 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the writer pads a block's tail that cannot hold a chunk header
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def history(run_dir: Path) -> list[dict]:
    """The logged rows of the run's offline W&B files (every `offline-run-*` folder under run_dir/wandb), in order.
    Nested keys (a table's fields) read as `name.field`; values are decoded from JSON."""
    rows = []
    for run_file in sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in records(run_file):
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or ".".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
