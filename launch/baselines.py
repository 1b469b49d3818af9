"""Scores the non-LLM baselines on the PAPI subjects and prints the per-trait table.

    python -m launch.baselines [--output=baselines.json] [--subjects=all] [--seed=0]
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import json
import pathlib

from absl import flags

from palign_jax import data
from palign_jax.errors import UserInputError
from palign_jax.evaluation import baselines, metrics, report

_OUTPUT = flags.DEFINE_string(
    "output", None, "Write a JSON file: method -> {A, C, E, N, O, sum} (mean error over "
    "subjects). Not written when unset.")
_SUBJECTS = flags.DEFINE_string(
    "subjects", "all", "Which PAPI subjects to score: 'all', comma-separated ids, or 0-based "
    "position ranges such as '0:10'. The baselines always learn from all 300 subjects "
    "(leave-one-subject-out / cross-validated), whatever is selected.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cross-validation folds and the bootstrap.")
_METHODS = flags.DEFINE_list("methods", list(baselines.BASELINE_METHODS),
                             "Baselines to score, comma-separated.")


def run_baselines(subject_spec: str, methods: list[str], seed: int) -> dict[str, metrics.Summary]:
  population = data.load_papi_subjects()
  chosen = data.parse_subject_spec(subject_spec, population)
  rows = [population.ids.index(s) for s in chosen.ids]
  summaries = {}
  for method in methods:
    predictions = baselines.predict(method, population.answers, seed=seed)[rows]
    errors = metrics.trait_errors(chosen.ids, predictions, chosen.answers)
    summaries[method] = metrics.summarize(errors, seed=seed)
  return summaries


def main(argv: list[str]) -> None:
  del argv
  unknown = [m for m in _METHODS.value if m not in baselines.BASELINE_METHODS]
  if unknown:
    raise UserInputError(f"--methods: unknown baseline(s) {unknown}; known: "
                                f"{', '.join(baselines.BASELINE_METHODS)}")
  summaries = run_baselines(_SUBJECTS.value, _METHODS.value, _SEED.value)
  n = next(iter(summaries.values())).n_subjects
  print(f"Non-LLM baselines, mean absolute error on the 180 held-out items ({n} subjects):")
  print(report.console_table(summaries))
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.summary_json(summaries), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  common.run(main)
