"""The PAPI metric: per-trait mean absolute error on held-out items.

For one subject and trait: the mean of |predicted - actual| over that trait's
held-out items, skipping items the subject did not answer (actual = 0).
Predictions are answers 1..5; 0 marks an unparsable/missing prediction, which
is left out of the mean but always counted (`n_unparsable`). Answers are
compared raw, not reverse-scored. Composite = sum over the five traits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from palign_jax import data

TRAITS = data.TRAITS


@dataclasses.dataclass(frozen=True)
class SubjectErrors:
  """Per-subject results of one method: `errors[subjects, 5]` in TRAITS order."""

  ids: tuple[str, ...]
  errors: np.ndarray  # float[subjects, 5]; NaN where a trait has nothing to score
  n_unparsable: np.ndarray  # int[subjects]
  n_missing_answers: np.ndarray  # int[subjects]: held-out items the subject left blank

  @property
  def composite(self) -> np.ndarray:
    return self.errors.sum(axis=1)


def trait_errors(ids, predictions: np.ndarray, answers: np.ndarray,
                 heldout: np.ndarray | None = None) -> SubjectErrors:
  """Scores predictions for the held-out items.

  Args:
    ids: subject ids, length `subjects`.
    predictions: `int[subjects, heldout]` answers 1..5 (0 = unparsable) or real values.
    answers: `int[subjects, 300]` the subjects' actual answers (0 = missing).
    heldout: `int[heldout]` 0-based item indices; defaults to the benchmark split.
  """
  if heldout is None:
    heldout = data.load_split().heldout
  traits = data.load_items().trait[heldout]
  actual = answers[:, heldout].astype(np.float64)
  predicted = np.asarray(predictions, dtype=np.float64)
  if predicted.shape != actual.shape:
    raise ValueError(f"predictions {predicted.shape} do not match answers {actual.shape}")
  valid = (actual > 0) & (predicted > 0)
  abs_error = np.where(valid, np.abs(predicted - actual), 0.0)
  errors = np.empty((len(actual), len(TRAITS)))
  for t in range(len(TRAITS)):
    in_trait = traits == t
    count = valid[:, in_trait].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      errors[:, t] = abs_error[:, in_trait].sum(axis=1) / count
  return SubjectErrors(
      ids=tuple(ids), errors=errors,
      n_unparsable=((predicted <= 0) & (actual > 0)).sum(axis=1),
      n_missing_answers=(actual == 0).sum(axis=1))
