"""Questionnaires other than PAPI: the file format, its checks, the prompt, the readouts.

Owns what `launch.answer` and `api.answer` administer. A questionnaire is a CSV file:

    # option: A, 5, Very Accurate          <- optional scale lines (key, value, label), in the
    # option: B, 4, Moderately Accurate       order shown; without them, PAPI's five options
    item,statement,trait,keyed
    talk1,Talk a lot.,E,+
    quiet1,Prefer to be alone.,E,-

Columns `item` and `statement` are required; `trait` (any label) and `keyed` (`+` or `-`,
empty = `+`) are optional and give trait scores. A scale can also come from its own CSV
(`key,value,label` columns; `config.answer.scale`). Every question is asked with PAPI's wording
and its answer is read from the next token after "Option (": each option's `key` must be one
token there, distinct from the others' (`check_scale`, which needs the tokenizer). Bad input
raises `UserInputError` naming the file, line, field and value.

Arrays: option log-probabilities `[profiles, items, options]` (full vocabulary); readouts over
the options renormalised, answers in the scale's values.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from palign_jax import data, prompts
from palign_jax.errors import UserInputError, input_error

OPTION_PREFIX = "# option:"
READOUTS = ("argmax", "median", "expected")
STATEMENT_FORMS = ("you", "as_written")
INSTRUCTION = ("Please choose from the following options to identify how accurately this "
               "statement describes you.\nOptions:\n")


@dataclasses.dataclass(frozen=True)
class Scale:
  """The answer options, in the order shown: `keys[o]` is read, `values[o]` is its answer."""

  keys: tuple[str, ...]
  values: np.ndarray  # f64[options]
  labels: tuple[str, ...]
  source: str = "PAPI"
  lines: tuple[int, ...] = ()  # the line of each option in `source` (empty: built in)


@dataclasses.dataclass(frozen=True)
class Questionnaire:
  """Items `[items]`, in file order."""

  source: str
  items: tuple[str, ...]
  statements: tuple[str, ...]
  traits: tuple[str, ...]  # "" where an item has no trait
  keyed: np.ndarray  # int[items], +1 or -1
  scale: Scale
  lines: tuple[int, ...]

  @property
  def has_traits(self) -> bool:
    return any(self.traits)

  def digest(self, statement_form: str) -> str:
    """What the questions and the scale are, as a short hash (resumed runs must match it)."""
    text = json.dumps([self.items, self.statements, self.traits, self.keyed.tolist(),
                       self.scale.keys, self.scale.values.tolist(), self.scale.labels,
                       statement_form])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def papi_scale() -> Scale:
  """PAPI's five options: A "Very Accurate" (5) ... E "Very Inaccurate" (1)."""
  values = [5, 4, 3, 2, 1]
  return Scale(prompts.OPTION_LETTERS, np.asarray(values, np.float64),
               tuple(data.ANSWER_LABELS[v] for v in values))


def _scale_from_rows(rows: Sequence[tuple[int, list[str]]], source: str) -> Scale:
  """rows: (line, [key, value, label]) -> a checked Scale (tokenisation aside)."""
  if len(rows) < 2:
    where = f"line {rows[0][0]}" if rows else "scale"
    raise input_error(source, where, f"a scale needs at least 2 options, got {len(rows)}")
  keys, values, labels, seen = [], [], [], {}
  for line, fields in rows:
    if len(fields) != 3 or not all(f.strip() for f in fields):
      raise input_error(source, f"line {line}", f"an option needs key, value and label, got "
                        f"{','.join(fields)!r}")
    key, value, label = (f.strip() for f in fields)
    try:
      number = float(value)
    except ValueError:
      raise input_error(source, f"line {line}, field 'value'",
                        f"{value!r} is not a number") from None
    if not np.isfinite(number):
      raise input_error(source, f"line {line}, field 'value'", f"{value!r} is not finite")
    for field, v in (("key", key), ("value", number), ("label", label)):
      if (field, v) in seen:
        raise input_error(source, f"line {line}, field {field!r}",
                          f"{v!r} is already used on line {seen[field, v]}")
      seen[field, v] = line
    keys.append(key)
    values.append(number)
    labels.append(label)
  return Scale(tuple(keys), np.asarray(values, np.float64), tuple(labels), source,
               tuple(line for line, _ in rows))


def load_scale(path: str | os.PathLike) -> Scale:
  """A scale CSV with columns `key,value,label`, one option per line in the order shown."""
  source, text = _read(path)
  reader = csv.DictReader(io.StringIO(text))
  missing = [c for c in ("key", "value", "label") if c not in (reader.fieldnames or [])]
  if missing:
    raise input_error(source, "line 1 (header)", f"missing column {missing[0]!r} (columns: "
                      f"{', '.join(reader.fieldnames or []) or 'none'})")
  rows = [(reader.line_num, [r["key"] or "", r["value"] or "", r["label"] or ""])
          for r in reader]
  return _scale_from_rows(rows, source)


def _read(path: str | os.PathLike) -> tuple[str, str]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserInputError(f"{path}: no such file")
  try:
    return str(path), path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as err:
    raise UserInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load(path: str | os.PathLike, scale: Scale | None = None) -> Questionnaire:
  """Parses and checks a questionnaire CSV; `scale` (e.g. `load_scale`) replaces the file's
  own option lines, if any, and PAPI's five options are the default."""
  source, text = _read(path)
  lines = text.splitlines()
  header = 0
  option_rows = []
  while header < len(lines) and (lines[header].startswith("#") or not lines[header].strip()):
    if lines[header].lower().startswith(OPTION_PREFIX):
      fields = next(csv.reader([lines[header][len(OPTION_PREFIX):]], skipinitialspace=True))
      option_rows.append((header + 1, fields))
    header += 1
  if option_rows and scale is None:
    scale = _scale_from_rows(option_rows, source)
  reader = csv.DictReader(io.StringIO("\n".join(lines[header:])))
  columns = reader.fieldnames or []
  for column in ("item", "statement"):
    if column not in columns:
      raise input_error(source, f"line {header + 1} (header)", f"missing column {column!r} "
                        f"(columns: {', '.join(columns) or 'none'})")
  items, statements, traits, keyed, where, seen = [], [], [], [], [], {}
  for row in reader:
    line = header + reader.line_num
    item, statement = (row["item"] or "").strip(), (row["statement"] or "").strip()
    if not item:
      raise input_error(source, f"line {line}, field 'item'", "empty item id")
    if item in seen:
      raise input_error(source, f"line {line}, field 'item'",
                        f"duplicate item {item!r} (first on line {seen[item]})")
    if not statement:
      raise input_error(source, f"line {line}, field 'statement'",
                        f"empty statement for item {item!r}")
    sign = (row.get("keyed") or "").strip() or "+"
    if sign not in ("+", "-"):
      raise input_error(source, f"line {line}, field 'keyed'",
                        f"{sign!r} is not '+' or '-' (item {item!r})")
    seen[item] = line
    items.append(item)
    statements.append(statement)
    traits.append((row.get("trait") or "").strip())
    keyed.append(1 if sign == "+" else -1)
    where.append(line)
  if not items:
    raise input_error(source, f"line {header + 1}", "no items after the header")
  return Questionnaire(source, tuple(items), tuple(statements), tuple(traits),
                       np.asarray(keyed, np.int64), scale or papi_scale(), tuple(where))


def from_ipip(indices: Sequence[int] | None = None) -> Questionnaire:
  """The IPIP-NEO items (0-based indices; default all 300) as a questionnaire, PAPI's scale."""
  items = data.load_items()
  indices = range(data.NUM_ITEMS) if indices is None else [int(j) for j in indices]
  return Questionnaire("IPIP-NEO-300", tuple(str(items.number[j]) for j in indices),
                       tuple(items.text[j] for j in indices),
                       tuple(data.TRAITS[items.trait[j]] for j in indices),
                       np.asarray([items.keyed[j] for j in indices], np.int64), papi_scale(),
                       tuple(j + 2 for j in indices))


def ipip_indices(questionnaire: Questionnaire) -> np.ndarray | None:
  """0-based IPIP-NEO item indices of the statements when every one is an IPIP-NEO item
  (same text, ignoring case), else None."""
  index = {t.lower().rstrip("."): j for j, t in enumerate(data.load_items().text)}
  found = [index.get(s.lower().rstrip(".")) for s in questionnaire.statements]
  return None if None in found else np.asarray(found, np.int64)


# --- prompts and tokens ------------------------------------------------------------------------

def question_text(statement: str, scale: Scale, statement_form: str = "you") -> str:
  """The user turn: PAPI's wording with the scale's options. With PAPI's scale and form "you"
  it is exactly `prompts.question(statement)`."""
  if statement_form not in STATEMENT_FORMS:
    raise UserInputError(f"statement_form: {statement_form!r} is not one of {STATEMENT_FORMS}")
  body = statement.rstrip(".")
  if statement_form == "you":
    body = "You " + body.lower()
  options = "".join(f"({k}). {label}\n" for k, label in zip(scale.keys, scale.labels,
                                                              strict=True))
  return f'Given a statement of you: "{body}."\n{INSTRUCTION}{options}'


def option_token_ids(tokenizer, scale: Scale, prefill: str = prompts.ANSWER_PREFILL
                     ) -> np.ndarray:
  """`int[options]`: each key's token after `prefill`; raises (naming the scale's file and line)
  unless every key is one token there and no two keys share it."""
  base = list(tokenizer.encode(prefill, add_special_tokens=False))
  ids, first = [], {}
  for o, key in enumerate(scale.keys):
    where = f"line {scale.lines[o]}, field 'key'" if scale.lines else f"option {o + 1}"
    extended = list(tokenizer.encode(prefill + key, add_special_tokens=False))
    if extended[:len(base)] != base or len(extended) != len(base) + 1:
      pieces = [tokenizer.decode([t]) for t in extended[len(base):]]
      raise input_error(scale.source, where, f"option key {key!r} tokenises ambiguously after "
                        f"{prefill!r} (as {pieces}); its answer cannot be read from one next "
                        "token: use a single letter or digit")
    if extended[-1] in first:
      raise input_error(scale.source, where, f"option key {key!r} is the same token as "
                        f"{first[extended[-1]]!r}")
    first[extended[-1]] = key
    ids.append(extended[-1])
  return np.asarray(ids, np.int32)


def check_scale(tokenizer, scale: Scale) -> None:
  """Raises unless the scale's keys can be read from one next token (`option_token_ids`)."""
  option_token_ids(tokenizer, scale)


# --- readouts ----------------------------------------------------------------------------------

def option_probabilities(log_probs: np.ndarray) -> np.ndarray:
  """`[..., options]` log-probabilities -> probabilities renormalised over the options."""
  log_probs = np.asarray(log_probs, np.float64)
  p = np.exp(log_probs - log_probs.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def read(log_probs: np.ndarray, values: np.ndarray, readout: str) -> np.ndarray:
  """Answers `[...]` in the scale's values from `[..., options]` log-probabilities.

  argmax: the most likely option's value; median: the median of the distribution over the
  values; expected: its mean (not a value of the scale in general).
  """
  p, values = option_probabilities(log_probs), np.asarray(values, np.float64)
  if readout == "argmax":
    return values[np.argmax(p, -1)]
  if readout == "expected":
    return p @ values
  if readout == "median":
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(p[..., order], -1)
    return values[order][np.argmax(cumulative >= 0.5 - 1e-12, -1)]
  raise UserInputError(f"readout: {readout!r} is not one of {READOUTS}")


def trait_scores(answers: np.ndarray, questionnaire: Questionnaire
                 ) -> tuple[tuple[str, ...], np.ndarray]:
  """`(traits, f64[..., traits])`: per trait the mean keyed answer (a reverse-keyed answer v
  counts as min + max - v) over its items; items without a trait are left out."""
  values = questionnaire.scale.values
  answers = np.asarray(answers, np.float64)
  keyed = np.where(questionnaire.keyed > 0, answers, values.min() + values.max() - answers)
  names = tuple(dict.fromkeys(t for t in questionnaire.traits if t))
  traits = np.asarray(questionnaire.traits)
  if not names:
    return names, np.zeros(answers.shape[:-1] + (0,))
  return names, np.stack([keyed[..., traits == t].mean(-1) for t in names], -1)
