"""Summaries of per-subject errors: means over subjects with percentile-bootstrap CIs.

The per-subject metric itself is PAPI's (`palign_jax.protocol.metric`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from palign_jax.protocol.metric import TRAITS, SubjectErrors, trait_errors  # noqa: F401


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
