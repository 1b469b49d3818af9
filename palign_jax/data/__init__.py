"""PAPI data: the 300 IPIP-NEO items, subjects' answers, and the 120/180 split.

Owns everything read from data files: the items and subjects shipped with the
package (converted from the PAPI release by `scripts/import_papi.py`), the
P² personality descriptions, and users' own answer files. Subjects are arrays
(`answers: int8[subjects, 300]`, 1..5, 0 = missing) so they batch and `vmap`.

Item numbers in files are the inventory's full-form numbers 1..300; arrays are
indexed by `item - 1`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import json
import pathlib
from typing import Any

import numpy as np

from palign_jax.errors import UserInputError

FILES = pathlib.Path(__file__).resolve().parent / "files"
NUM_ITEMS = 300
TRAITS = ("A", "C", "E", "N", "O")
TRAIT_NAMES = {
    "A": "Agreeableness", "C": "Conscientiousness", "E": "Extraversion",
    "N": "Neuroticism", "O": "Openness",
}
# Answer value -> option letter and label of the benchmark prompt.
ANSWER_LETTERS = {5: "A", 4: "B", 3: "C", 2: "D", 1: "E"}
ANSWER_LABELS = {
    5: "Very Accurate", 4: "Moderately Accurate", 3: "Neither Accurate Nor Inaccurate",
    2: "Moderately Inaccurate", 1: "Very Inaccurate",
}


@dataclasses.dataclass(frozen=True)
class Items:
  """The 300 IPIP-NEO items, indexed by `item - 1`."""

  number: np.ndarray  # int[300], 1..300
  short_form: np.ndarray  # int[300], 1..120, 0 if not in the short form
  keyed: np.ndarray  # int[300], +1 or -1 (reverse-scored)
  trait: np.ndarray  # int[300], index into TRAITS
  facet_code: tuple[str, ...]
  facet: tuple[str, ...]
  text: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Split:
  """The benchmark split, as 0-based item indices."""

  known: np.ndarray  # int[120], short-form order (the order of the few-shot context)
  heldout: np.ndarray  # int[180], ascending


@dataclasses.dataclass(frozen=True)
class Subjects:
  """A batch of subjects: ids and answers to all 300 items (0 = missing/unknown)."""

  ids: tuple[str, ...]
  answers: np.ndarray  # int8[subjects, 300]

  def __len__(self) -> int:
    return len(self.ids)

  def select(self, ids: list[str] | tuple[str, ...]) -> Subjects:
    index = {s: i for i, s in enumerate(self.ids)}
    unknown = [s for s in ids if s not in index]
    if unknown:
      raise UserInputError(f"unknown subject id(s): {', '.join(map(str, unknown[:10]))}")
    rows = [index[s] for s in ids]
    return Subjects(tuple(ids), self.answers[rows])


@functools.cache
def load_items() -> Items:
  """Loads the shipped item table."""
  with open(FILES / "ipip_neo_300_items.csv", newline="", encoding="utf-8") as f:
    rows = sorted(csv.DictReader(f), key=lambda r: int(r["item"]))
  assert [int(r["item"]) for r in rows] == list(range(1, NUM_ITEMS + 1))
  return Items(
      number=np.array([int(r["item"]) for r in rows]),
      short_form=np.array([int(r["short_form_item"] or 0) for r in rows]),
      keyed=np.array([1 if r["keyed"] == "+" else -1 for r in rows]),
      trait=np.array([TRAITS.index(r["trait"]) for r in rows]),
      facet_code=tuple(r["facet_code"] for r in rows),
      facet=tuple(r["facet"] for r in rows),
      text=tuple(r["text"] for r in rows),
  )


@functools.cache
def load_split() -> Split:
  """The 120 known items (exactly the IPIP-NEO-120 short form) and 180 held out."""
  items = load_items()
  in_short = np.flatnonzero(items.short_form)
  known = in_short[np.argsort(items.short_form[in_short])]
  heldout = np.flatnonzero(items.short_form == 0)
  return Split(known=known, heldout=heldout)


@functools.cache
def load_papi_subjects() -> Subjects:
  """The 300 PAPI test subjects shipped with the package."""
  return load_subjects_file(FILES / "papi_subjects.csv")


@functools.cache
def load_descriptions() -> dict[str, str]:
  """P² personality descriptions (second person) of the PAPI subjects, by id."""
  with gzip.open(FILES / "papi_descriptions.json.gz", "rt", encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------
# Subjects files
#
# Accepted formats (item = full-form IPIP-NEO number 1..300; answer 1..5,
# 0 or empty = not answered):
#   * wide CSV: a column `id` and columns `i1`..`i300` (any subset of them;
#     extra non-item columns such as `sex` are ignored);
#   * long CSV: columns `subject`, `item`, `answer` (one row per answer; other
#     columns such as `text` are ignored) - the format of
#     `examples/my_answers.csv`;
#   * JSON: a list of objects, each either {"id": ..., "answers": {"<item>": answer}}
#     or PAPI's {"case": ..., "i1": ..., "i300": ...}; or {"subjects": [...]}.
# ---------------------------------------------------------------------------


def load_subjects_file(path: str | pathlib.Path) -> Subjects:
  """Reads and validates a subjects file (CSV or JSON; see the formats above)."""
  path = pathlib.Path(path)
  source = str(path)
  if not path.is_file():
    raise UserInputError(f"{source}: no such file")
  text = path.read_text(encoding="utf-8-sig")
  if not text.strip():
    raise UserInputError(f"{source}: the file is empty")
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserInputError(f"{source}: not valid JSON ({e})") from None
    records = _records_from_json(data, source)
  else:
    records = _records_from_csv(text, source)
  if not records:
    raise UserInputError(f"{source}: no subjects found")
  ids, answers = [], np.zeros((len(records), NUM_ITEMS), np.int8)
  seen: dict[str, str] = {}
  for row, (where, subject_id, item_answers) in enumerate(records):
    if subject_id in seen:
      raise UserInputError(
          f"{source}: {where}: subject id {subject_id!r} is duplicated (first seen at "
          f"{seen[subject_id]})")
    seen[subject_id] = where
    ids.append(subject_id)
    for item, answer in item_answers:
      answers[row, item - 1] = answer
  return Subjects(tuple(ids), answers)


def _parse_int(value: Any, source: str, where: str, field: str, low: int, high: int,
               allow_empty: bool = False) -> int:
  if allow_empty and (value is None or (isinstance(value, str) and not value.strip())):
    return 0
  if isinstance(value, bool) or not isinstance(value, (int, str, float)):
    raise UserInputError(f"{source}: {where}: field '{field}' must be an integer, got "
                         f"{value!r}")
  try:
    number = float(value)
  except ValueError:
    raise UserInputError(f"{source}: {where}: field '{field}' must be an integer, got "
                         f"{value!r}") from None
  if number != int(number):
    raise UserInputError(f"{source}: {where}: field '{field}' must be an integer, got "
                         f"{value!r}")
  number = int(number)
  if not low <= number <= high:
    raise UserInputError(f"{source}: {where}: field '{field}' is {value!r}, outside "
                         f"{low}..{high}")
  return number


def _parse_id(value: Any, source: str, where: str, field: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
    raise UserInputError(f"{source}: {where}: field '{field}' must be a non-empty string or "
                         f"integer, got {value!r}")
  return str(value).strip()


def _item_number(key: str, source: str, where: str) -> int:
  digits = key[1:] if key.startswith("i") else key
  if not digits.isdigit() or not 1 <= int(digits) <= NUM_ITEMS:
    raise UserInputError(f"{source}: {where}: unknown item {key!r} (items are 1..{NUM_ITEMS})")
  return int(digits)


Record = tuple[str, str, list[tuple[int, int]]]


def _records_from_json(data: Any, source: str) -> list[Record]:
  if isinstance(data, dict) and "subjects" in data:
    data = data["subjects"]
  if not isinstance(data, list):
    raise UserInputError(f"{source}: expected a list of subjects (or {{\"subjects\": [...]}}), "
                         f"got {type(data).__name__}")
  records = []
  for n, entry in enumerate(data):
    where = f"subject #{n + 1}"
    if not isinstance(entry, dict):
      raise UserInputError(f"{source}: {where}: expected an object, got {entry!r:.60}")
    if "answers" in entry:
      if "id" not in entry:
        raise UserInputError(f"{source}: {where}: missing field 'id'")
      subject_id = _parse_id(entry["id"], source, where, "id")
      where = f"subject {subject_id!r}"
      raw = entry["answers"]
      if not isinstance(raw, dict):
        raise UserInputError(f"{source}: {where}: field 'answers' must be an object mapping "
                             f"item number to answer, got {type(raw).__name__}")
      pairs = list(raw.items())
    elif "case" in entry:
      subject_id = _parse_id(entry["case"], source, where, "case")
      where = f"subject {subject_id!r}"
      pairs = [(k, v) for k, v in entry.items() if k.startswith("i") and k[1:].isdigit()]
      missing = [f"i{j}" for j in range(1, NUM_ITEMS + 1) if f"i{j}" not in entry]
      if missing:
        raise UserInputError(f"{source}: {where}: missing field '{missing[0]}'"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
      extra = [k for k, _ in pairs if not 1 <= int(k[1:]) <= NUM_ITEMS]
      if extra:
        raise UserInputError(f"{source}: {where}: unknown item {extra[0]!r} "
                             f"(items are 1..{NUM_ITEMS})")
    else:
      raise UserInputError(f"{source}: {where}: missing field 'id' (with 'answers') or 'case' "
                           "(PAPI format)")
    item_answers = []
    for key, value in pairs:
      item = _item_number(str(key), source, where)
      item_answers.append(
          (item, _parse_int(value, source, where, f"item {key}", 0, 5, allow_empty=True)))
    records.append((where, subject_id, item_answers))
  return records


def _records_from_csv(text: str, source: str) -> list[Record]:
  reader = csv.DictReader(text.splitlines())
  header = reader.fieldnames or []
  if {"subject", "item", "answer"} <= set(header):
    return _records_from_long_csv(reader, source)
  if "id" not in header:
    raise UserInputError(f"{source}: header {header[:6]}... needs either 'subject,item,answer' "
                         "(long format) or 'id,i1..i300' (wide format): missing field 'id'")
  item_columns = [h for h in header if h.startswith("i") and h[1:].isdigit()]
  for column in item_columns:
    _item_number(column, source, "header")
  if not item_columns:
    raise UserInputError(f"{source}: header has no item columns i1..i300")
  records = []
  for line, row in enumerate(reader, start=2):
    where = f"line {line}"
    if None in row or any(v is None for v in row.values()):
      raise UserInputError(f"{source}: {where}: expected {len(header)} fields, the row has a "
                           "different number")
    subject_id = _parse_id(row["id"], source, where, "id")
    item_answers = [(int(c[1:]), _parse_int(row[c], source, f"{where} (subject {subject_id!r})",
                                            c, 0, 5, allow_empty=True)) for c in item_columns]
    records.append((where, subject_id, item_answers))
  return records


def _records_from_long_csv(reader: csv.DictReader, source: str) -> list[Record]:
  by_subject: dict[str, tuple[str, list[tuple[int, int]], set[int]]] = {}
  for line, row in enumerate(reader, start=2):
    where = f"line {line}"
    subject_id = _parse_id(row["subject"], source, where, "subject")
    item = _parse_int(row["item"], source, where, "item", 1, NUM_ITEMS)
    answer = _parse_int(row["answer"], source, where, "answer", 0, 5, allow_empty=True)
    first, pairs, seen = by_subject.setdefault(subject_id, (where, [], set()))
    if item in seen:
      raise UserInputError(f"{source}: {where}: subject {subject_id!r} answers item {item} twice")
    seen.add(item)
    pairs.append((item, answer))
  return [(first, sid, pairs) for sid, (first, pairs, _) in by_subject.items()]


def known_answers(subjects: Subjects) -> np.ndarray:
  """The subjects' answers to the 120 known items, `int8[subjects, 120]` (short-form order)."""
  return subjects.answers[:, load_split().known]


def parse_subject_spec(spec: str, available: Subjects) -> Subjects:
  """Selects subjects by a flag value: 'all', ids '172481,172482', or index ranges '0:8'.

  Ranges are 0-based positions in the PAPI order (`0:8` = the first eight subjects).
  A path to an answers file loads that file instead.
  """
  spec = spec.strip()
  if spec == "all":
    return available
  if pathlib.Path(spec).suffix.lower() in (".csv", ".json") or pathlib.Path(spec).is_file():
    return load_subjects_file(spec)
  ids: list[str] = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if ":" in part:
      start, _, stop = part.partition(":")
      try:
        positions = range(int(start or 0), int(stop) if stop else len(available))
      except ValueError:
        raise UserInputError(f"--subjects: {part!r} is not a range like 0:8") from None
      if positions.stop > len(available) or positions.start < 0:
        raise UserInputError(f"--subjects: range {part!r} is outside 0:{len(available)}")
      ids.extend(available.ids[i] for i in positions)
    else:
      ids.append(part)
  if not ids:
    raise UserInputError(f"--subjects: {spec!r} selects no subjects")
  return available.select(ids)
