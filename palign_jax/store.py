"""Results on disk: append-only JSONL files of per-(subject, method) records, resumable.

An output directory holds `run.json` (what produced the results: model
fingerprint, configuration, prompt version) and `records.jsonl`, one JSON
object per finished (subject, method). Each record is written with a single
`write` of a whole line followed by `fsync`, so a kill at any moment leaves at
most one unfinished last line; opening the store drops that fragment (it was
never a finished result) and a rerun recomputes it. A directory made by another
model or configuration is refused, never overwritten.

Several processes share a directory through shards: process i of n appends to
`records.process-i-of-n.jsonl` only (no two processes write one file), and
every store reads every shard, so a report merges them and a rerun, with any
number of processes, skips what any of them finished.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from palign_jax.errors import UserInputError

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
SHARD_GLOB = "records*.jsonl"


def shard_file(process: int, processes: int) -> str:
  """The records file of one process of a multi-process run (`records.jsonl` alone)."""
  return RECORDS_FILE if processes == 1 else f"records.process-{process}-of-{processes}.jsonl"


def _describe_difference(old: dict, new: dict) -> str:
  keys = sorted(set(old) | set(new))
  diffs = [f"{k}: {old.get(k)!r} (in the directory) vs {new.get(k)!r} (now)"
           for k in keys if old.get(k) != new.get(k)]
  return "; ".join(diffs[:5])


class ResultStore:
  """Per-(subject, method) records of one evaluation run in `directory`."""

  def __init__(self, directory: str | os.PathLike, identity: dict[str, Any],
               records_file: str = RECORDS_FILE, writes: bool = True):
    """Opens or creates the store; refuses a directory made with another `identity`.

    Args:
      identity: JSON-able description of what produces the results (model
        fingerprint, prompt version, method settings, seed). Records are only
        comparable when it is equal.
      records_file: the file this store appends to (`shard_file` for a process of a
        multi-process run); the other `records*.jsonl` files are read, never written.
      writes: False for the processes of a pod run other than process 0: they compute the same
        records together, and one process writes them (`append` only remembers them).
    """
    self.writes = writes
    self.directory = pathlib.Path(directory)
    self.identity = json.loads(json.dumps(identity))
    self.directory.mkdir(parents=True, exist_ok=True)
    run_path = self.directory / RUN_FILE
    if run_path.exists():
      try:
        existing = json.loads(run_path.read_text())
      except json.JSONDecodeError as e:
        raise UserInputError(f"{run_path}: not valid JSON ({e}); delete the directory or use "
                             "another --output_dir") from None
      if existing != self.identity:
        raise UserInputError(
            f"{self.directory}: holds results of another model or configuration "
            f"({_describe_difference(existing, self.identity)}). Results are never mixed or "
            "overwritten: choose a new --output_dir, or delete this one to start fresh.")
    elif writes:
      _atomic_write(run_path, json.dumps(self.identity, indent=2, sort_keys=True) + "\n")
    self.records_path = self.directory / records_file
    self._records = self._load()

  def _load(self) -> dict[tuple[str, str], dict]:
    """Every shard's finished records (this store's own file first truncated to whole lines)."""
    records: dict[tuple[str, str], dict] = {}
    if self.writes and self.records_path.exists():
      raw = self.records_path.read_bytes()
      complete_end = raw.rfind(b"\n") + 1
      if complete_end < len(raw):  # an unfinished last line from an interrupted write
        with open(self.records_path, "r+b") as f:
          f.truncate(complete_end)
    for path in sorted(self.directory.glob(SHARD_GLOB)):
      records.update(self._read(path))
    return records

  @staticmethod
  def _read(path: pathlib.Path) -> dict[tuple[str, str], dict]:
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]  # another process may be writing its last line
    records = {}
    for number, line in enumerate(complete.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key = (str(record["subject"]), str(record["method"]))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}: line {number} is not a result record ({e}); the file "
                             "was edited by hand?") from None
      records[key] = record
    return records

  def refresh(self) -> None:
    """Reads the records other processes appended since this store was opened."""
    for path in sorted(self.directory.glob(SHARD_GLOB)):
      if path != self.records_path:
        self._records.update(self._read(path))

  def has(self, subject: str, method: str) -> bool:
    return (str(subject), method) in self._records

  def get(self, subject: str, method: str) -> dict | None:
    return self._records.get((str(subject), method))

  def records(self) -> list[dict]:
    return list(self._records.values())

  def append(self, record: dict) -> None:
    """Durably appends one finished record (must have 'subject' and 'method')."""
    key = (str(record["subject"]), str(record["method"]))
    if not self.writes:
      self._records[key] = record
      return
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line)
      os.fsync(fd)
    finally:
      os.close(fd)
    self._records[key] = record


def atomic_path(path: str | os.PathLike) -> pathlib.Path:
  """A fresh temporary path next to `path`, to write into and then `os.replace` onto it (so
  readers, and other processes writing the same file, never see half a file)."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
  os.close(fd)
  return pathlib.Path(tmp)


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = atomic_path(path)
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  _atomic_write(pathlib.Path(path), json.dumps(value, indent=2, sort_keys=True) + "\n")
