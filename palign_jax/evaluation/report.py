"""Reporting: per-method summaries and paired verdicts as JSON, markdown and console tables."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from palign_jax.evaluation.metrics import TRAITS, Paired, Summary

COLUMNS = list(TRAITS) + ["sum"]


def _fmt(value: float) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def summary_json(summaries: dict[str, Summary]) -> dict[str, dict[str, float]]:
  """method -> {A, C, E, N, O, sum} (means over subjects)."""
  return {method: {k: s.mean[k] for k in COLUMNS} for method, s in summaries.items()}


def markdown_table(summaries: dict[str, Summary], *, notes: dict[str, str] | None = None,
                   extras: dict[str, dict] | None = None) -> str:
  """A markdown table: per-trait error, sum with its 95% CI, counts, letter mass, seconds.

  extras: row -> {"seconds_per_subject", "letter_mass_mean", "letter_mass_min"} (see
  `methods.summaries_from_records`).
  """
  notes, extras = notes or {}, extras or {}
  header = ["method"] + COLUMNS + ["sum 95% CI", "subjects", "missing answers", "unparsable",
                                   "letter mass (mean / min)", "s / subject", "notes"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, s in summaries.items():
    extra = extras.get(method, {})
    seconds = extra.get("seconds_per_subject")
    mass = ("-" if extra.get("letter_mass_mean") is None else
            f"{extra['letter_mass_mean']:.3f} / {extra['letter_mass_min']:.3f}")
    row = ([method] + [_fmt(s.mean[k]) for k in COLUMNS]
           + [f"{_fmt(s.ci_low['sum'])}–{_fmt(s.ci_high['sum'])}", str(s.n_subjects),
              str(s.n_missing_answers), str(s.n_unparsable), mass,
              "" if seconds is None or math.isnan(seconds) else f"{seconds:.1f}",
              notes.get(method, "")])
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def console_table(summaries: dict[str, Summary]) -> str:
  """A fixed-width table for the terminal."""
  width = max([len(m) for m in summaries] + [6])
  lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>6}" for c in COLUMNS)
           + "  sum 95% CI      unparsable"]
  for method, s in summaries.items():
    lines.append(f"{method:<{width}}  " + "  ".join(f"{_fmt(s.mean[c]):>6}" for c in COLUMNS)
                 + f"  {_fmt(s.ci_low['sum'])}–{_fmt(s.ci_high['sum'])}  {s.n_unparsable:>10}")
  return "\n".join(lines)


def model_line(model: dict | None) -> str:
  """E.g. "SmolLM2-135M-Instruct.Q4_1.gguf (float32), fingerprint 0123abcd...", from a run's
  identity."""
  if not model:
    return "none (non-LLM baselines only)"
  name = pathlib.PurePath(str(model.get("source", "?"))).name
  return f"{name} ({model.get('dtype', '?')}), fingerprint {model.get('fingerprint', '?')}"


def verdict_table(verdicts: Sequence[Paired]) -> str:
  """Markdown: each paired comparison, per-subject wins/ties/losses and the mean change."""
  lines = ["| row | against | subjects | better / tied / worse | mean change in sum (95% CI) |",
           "|---|---|---|---|---|"]
  for v in verdicts:
    lines.append(f"| {v.row} | {v.reference} | {v.n_subjects} | {v.wins} / {v.ties} / "
                 f"{v.losses} | {v.mean:+.3f} ({v.ci_low:+.3f} to {v.ci_high:+.3f}) |")
  return "\n".join(lines)


def headline_table(summaries: dict[str, Summary], extras: dict[str, dict],
                   verdicts: Sequence[Paired]) -> str:
  """The printed summary: one row per method (its headline readout), the composite with its
  CI, the paired verdicts against few_shot and always-3, and the letter mass."""
  against = {(v.row, v.reference): v for v in verdicts}

  def cell(row, reference):
    v = against.get((row, reference))
    return "" if v is None else f"{v.mean:+.3f}, {v.wins}/{v.ties}/{v.losses}"

  lines = ["| method | sum (95% CI) | vs few_shot: change, better/tied/worse | vs always 3 | "
           "letter mass |", "|---|---|---|---|---|"]
  for row, s in summaries.items():
    if "[" in row:
      continue
    extra = extras.get(row, {})
    mass = "" if extra.get("letter_mass_mean") is None else f"{extra['letter_mass_mean']:.3f}"
    lines.append(f"| {row} | {_fmt(s.mean['sum'])} ({_fmt(s.ci_low['sum'])}–"
                 f"{_fmt(s.ci_high['sum'])}) | {cell(row, 'few_shot')} | "
                 f"{cell(row, 'constant_3')} | {mass} |")
  return "\n".join(lines)
