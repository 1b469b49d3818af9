"""The PAPI metric: per-trait mean absolute error on held-out items, and summaries.

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


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean over subjects per trait and of the composite, with bootstrap 95% CIs."""

  mean: dict[str, float]  # TRAITS and "sum"
  ci_low: dict[str, float]
  ci_high: dict[str, float]
  n_subjects: int
  n_unparsable: int
  n_missing_answers: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def summarize(result: SubjectErrors, *, n_bootstrap: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> Summary:
  """Averages over subjects, with a percentile bootstrap CI over subjects.

  Subjects with a NaN trait (nothing scorable) are left out of that trait's mean.
  """
  table = np.concatenate([result.errors, result.composite[:, None]], axis=1)
  names = list(TRAITS) + ["sum"]
  rng = np.random.default_rng(seed)
  n = len(table)
  resamples = rng.integers(0, n, size=(n_bootstrap, n)) if n else np.zeros((0, 0), int)
  mean, low, high = {}, {}, {}
  tail = (1 - confidence) / 2 * 100
  for k, name in enumerate(names):
    column = table[:, k]
    mean[name] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
    if n > 1 and np.isfinite(column).any():
      boot = np.nanmean(column[resamples], axis=1)
      low[name], high[name] = (float(v) for v in np.nanpercentile(boot, [tail, 100 - tail]))
    else:
      low[name] = high[name] = mean[name]
  return Summary(mean=mean, ci_low=low, ci_high=high, n_subjects=n,
                 n_unparsable=int(result.n_unparsable.sum()),
                 n_missing_answers=int(result.n_missing_answers.sum()))
