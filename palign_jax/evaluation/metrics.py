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


@dataclasses.dataclass(frozen=True)
class Paired:
  """A row against a reference row on the same subjects: per-subject differences of the
  composite error (row - reference; negative = the row is closer to the person)."""

  row: str
  reference: str
  n_subjects: int
  mean: float  # mean difference
  ci_low: float  # paired percentile bootstrap over subjects
  ci_high: float
  wins: int  # subjects where the row's error is lower
  ties: int  # equal to within TIE
  losses: int
  differences: tuple[float, ...]  # per subject, in the subjects' order (NaN left out)

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), differences=list(self.differences))

  def sentence(self) -> str:
    """E.g. "better for 4 of 10 subjects, worse for 3 (3 ties); mean change -0.120
    (95% CI -0.300 to 0.050)"."""
    return (f"better for {self.wins} of {self.n_subjects} subjects, worse for {self.losses} "
            f"({self.ties} ties); mean change {self.mean:+.3f} (95% CI {self.ci_low:+.3f} to "
            f"{self.ci_high:+.3f})")


TIE = 1e-9  # composite errors this close are the same predictions scored twice


def paired(row: str, values: np.ndarray, reference: str, reference_values: np.ndarray, *,
           n_bootstrap: int = 2000, seed: int = 0, confidence: float = 0.95) -> Paired:
  """Compares two rows' per-subject composite errors `[subjects]` (same subjects, same
  order; a subject missing from either, NaN, is left out)."""
  diff = np.asarray(values, np.float64) - np.asarray(reference_values, np.float64)
  diff = diff[np.isfinite(diff)]
  n = len(diff)
  mean = float(diff.mean()) if n else float("nan")
  low = high = mean
  if n > 1:
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail]))
  return Paired(row=row, reference=reference, n_subjects=n, mean=mean, ci_low=low,
                ci_high=high, wins=int((diff < -TIE).sum()), ties=int((np.abs(diff) <= TIE).sum()),
                losses=int((diff > TIE).sum()), differences=tuple(float(d) for d in diff))
