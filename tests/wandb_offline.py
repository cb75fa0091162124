"""Read what an offline W&B run recorded, from its ``run-ID.wandb`` file.

wandb 0.31 ships no reader for offline run files, so this parses the file itself: a LevelDB-style
log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records with 7-byte headers: CRC, length,
type FULL/FIRST/MIDDLE/LAST) whose payloads are wandb's own ``Record`` protobuf messages. What
``wandb sync`` would upload: the run's name, group, job type, tags, config, summary, the media
files it lists and its artifacts (their files are staged in W&B's data folder, ``WANDB_DATA_DIR``).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path):
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """The parts of an offline run that the W&B UI shows."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass
class Artifact:
    """An artifact the run logged: its files map a name in the artifact to the staged copy."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, Path]


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """Parse ``run_dir/run-*.wandb`` (a folder ``offline-run-DATE-ID``).

    The W&B service writes the file in the background and may still be writing it when
    ``wandb.finish()`` returns: the file is read again until it holds the run's ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        run, finished = _read(Path(run_dir))
        if finished or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read(run_dir: Path) -> tuple[OfflineRun, bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(run_dir.glob("run-*.wandb"))
    run, finished = OfflineRun(), False
    if not files:
        return run, finished
    for payload in _payloads(files[0]):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # a record still being written: read the file again later
            return run, False
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run  # the first run record, then updates (tags set later...)
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.tags = list(r.tags) or run.tags
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append(
                Artifact(
                    a.name,
                    a.type,
                    list(a.aliases),
                    json.loads(a.metadata or "{}"),
                    {c.path: Path(c.local_path) for c in a.manifest.contents},
                )
            )
        elif kind == "exit":
            finished = True
    return run, finished
