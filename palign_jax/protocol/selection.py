"""Honest selection on the known items, shared by PAS (alpha) and DPO (steps): one that can
decline to change the model.

Candidates are ordered from "no change" (index 0: alpha 0, or 0 DPO steps, always
admissible) to the most change. For each candidate the protocol gives the known items'
out-of-fold letter log-probabilities (never scored with the item's own answer in the context
or in training). Selection then:

1. **Readout first, at no change.** Each readout's error is taken at candidate 0 and the
   lowest wins (ties: the earlier readout in `config.readout.decodings`). Choosing readout and
   candidate in one flat argmin over every pair (5 readouts x 6 alphas = 30 tries on 120
   items) rewards noise; fixing the readout where the model is unchanged also makes the
   `few_shot` row (alpha 0) and the `pas` row read answers the same way, so their paired
   difference is the steering alone.
2. **Admissible candidates.** A candidate whose known-item letter mass (the probability the
   model puts on the five letters at all) falls much below candidate 0's is out: the readout
   renormalises over the letters, so where the model stops answering with a letter the
   "answer" is noise. Both the mean over items and a low quantile must stay above fixed
   shares of candidate 0's (`config.selection`, set before any test result was seen).
3. **The benchmark's own metric**: the sum over the five traits of the per-trait mean absolute
   error over the answered known items (out of fold), as PAPI scores the held-out items.
4. **One standard error toward no change.** Among admissible candidates, the best error plus
   `se_rule` standard errors is the bar; the *first* candidate (least change) under it wins.
   The standard error is over items: for the composite, `sqrt(sum_t var_t / n_t)` of the
   best candidate's per-item absolute errors (ddof 1), trait by trait.

`Selection.record()` keeps every number that made the choice (errors, standard errors, letter
masses, which candidates were inadmissible and why). `oof_predictions` reads the known
items' answers in each readout fold by fold, as both protocols need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from palign_jax import data, readout
from palign_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
  """`config.selection`: admissibility and the standard-error rule."""

  min_mass_ratio: float  # a candidate's mean letter mass must be >= this x candidate 0's
  min_low_mass_ratio: float  # and its `mass_quantile` quantile >= this x candidate 0's
  mass_quantile: float  # the low quantile of the per-item letter mass (0.1 = 10th percentile)
  se_rule: float  # standard errors of slack toward no change (0: plain argmin)

  @classmethod
  def from_config(cls, config) -> SelectionSettings:
    s = config.selection
    settings = cls(min_mass_ratio=float(s.min_mass_ratio),
                   min_low_mass_ratio=float(s.min_low_mass_ratio),
                   mass_quantile=float(s.mass_quantile), se_rule=float(s.se_rule))
    for name in ("min_mass_ratio", "min_low_mass_ratio"):
      if not 0.0 <= getattr(settings, name) <= 1.0:
        raise UserInputError(f"config.selection.{name}: {getattr(settings, name)} is outside "
                             "[0, 1]")
    if not 0.0 <= settings.mass_quantile <= 0.5:
      raise UserInputError(f"config.selection.mass_quantile: {settings.mass_quantile} is outside "
                           "[0, 0.5]")
    if settings.se_rule < 0:
      raise UserInputError(f"config.selection.se_rule: {settings.se_rule} must be >= 0")
    return settings


def mass_stats(log_probs: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
  """`(mean [C], low quantile [C])` of the letter mass of `[C, items, 5]` log-probabilities."""
  mass = readout.letter_mass(log_probs)
  return mass.mean(-1), np.quantile(mass, quantile, axis=-1)


def composite_error(predicted: np.ndarray, actual: np.ndarray,
                    traits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The benchmark's metric on items and its standard error over items.

  predicted: `[C, n]` answers 1..5; actual: `[n]` (0 = unanswered, left out); traits: `[n]`.
  Returns `(error [C], standard error [C])`: the sum over traits of the per-trait mean
  |predicted - actual| (a trait with no answered item adds 0), and `sqrt(sum_t var_t / n_t)`.
  """
  predicted = np.asarray(predicted, np.float64)
  answered = np.asarray(actual) > 0
  error = np.zeros(predicted.shape[0])
  variance = np.zeros(predicted.shape[0])
  for t in range(len(data.TRAITS)):
    mask = answered & (traits == t)
    n = int(mask.sum())
    if not n:
      continue
    abs_error = np.abs(predicted[:, mask] - actual[mask])
    error += abs_error.mean(-1)
    if n > 1:
      variance += abs_error.var(-1, ddof=1) / n
  return error, np.sqrt(variance)


def oof_predictions(log_probs: np.ndarray, prior: np.ndarray, known: np.ndarray,
                    fold: np.ndarray, decodings: Sequence[str]) -> dict[str, np.ndarray]:
  """decoding -> `int[C, n]` out-of-fold answers on the known items.

  log_probs: `[C, n, 5]`, each item scored by the candidate that did not see its answer;
  prior: `[folds, C, 5]` content-free prior of each fold's context; known: `int[n]` answers;
  fold: `int[n]`. `matched` maps each fold's items with a quantile map fitted on the other
  folds' items and answers, never its own.
  """
  out = {d: np.zeros(log_probs.shape[:2], np.int64) for d in decodings}
  for f in range(prior.shape[0]):
    in_fold = fold == f
    for c in range(log_probs.shape[0]):
      for d in decodings:
        out[d][c, in_fold], _ = readout.decode(
            log_probs[c, in_fold], d, prior=prior[f, c],
            match=(log_probs[c, ~in_fold], known[~in_fold]))
  return out


@dataclasses.dataclass
class Selection:
  """One subject's choice, with the numbers that made it."""

  decoding: str  # the readout chosen at candidate 0 (or fixed by the config)
  index: int  # the chosen candidate
  best: int  # the admissible candidate with the lowest error
  errors: dict[str, np.ndarray]  # decoding -> [C] known-item composite error
  standard_error: np.ndarray  # [C] of the chosen decoding's errors
  bar: float  # errors[best] + se_rule * standard_error[best]
  mass_mean: np.ndarray  # [C]
  mass_low: np.ndarray  # [C]
  inadmissible: dict[int, str]  # candidate -> why

  def record(self, labels: Sequence) -> dict:
    """A JSON-ready account of the choice; `labels` name the candidates (alphas, steps)."""
    as_list = lambda a: [None if not np.isfinite(v) else float(v) for v in a]
    return {
        "criterion": "sum over traits of the mean |answer - actual| on the known items, out "
                     "of fold",
        "candidates": list(labels), "chosen": labels[self.index], "best": labels[self.best],
        "decoding": self.decoding, "error": as_list(self.errors[self.decoding]),
        "error_by_decoding": {d: as_list(e) for d, e in self.errors.items()},
        "standard_error": as_list(self.standard_error),
        "standard_error_over": "items",
        "bar": float(self.bar),
        "letter_mass_mean": as_list(self.mass_mean), "letter_mass_low": as_list(self.mass_low),
        "inadmissible": {str(labels[c]): why for c, why in sorted(self.inadmissible.items())},
    }


def choose_decoding(errors_at_zero: dict[str, float], decodings: Sequence[str],
                    choice: str) -> str:
  """The readout: the config's fixed one, or ("kfold") the lowest error at no change (ties:
  the earlier in `decodings`)."""
  if choice != "kfold":
    return choice
  return min(decodings, key=lambda d: (errors_at_zero[d], decodings.index(d)))


def admissible(mass_mean: np.ndarray, mass_low: np.ndarray, settings: SelectionSettings,
               usable: np.ndarray | None = None) -> dict[int, str]:
  """candidate -> why it is not admissible (candidate 0 always is)."""
  why = {}
  mean_bar = settings.min_mass_ratio * mass_mean[0]
  low_bar = settings.min_low_mass_ratio * mass_low[0]
  for c in range(1, len(mass_mean)):
    if usable is not None and not usable[c]:
      why[c] = "not available (see the notes)"
    elif not mass_mean[c] >= mean_bar:
      why[c] = (f"letter mass mean {mass_mean[c]:.3f} < {settings.min_mass_ratio:g} x "
                f"{mass_mean[0]:.3f} (no change)")
    elif not mass_low[c] >= low_bar:
      why[c] = (f"letter mass {settings.mass_quantile:g}-quantile {mass_low[c]:.3f} < "
                f"{settings.min_low_mass_ratio:g} x {mass_low[0]:.3f} (no change)")
  return why


def choose_candidate(error: np.ndarray, standard_error: np.ndarray,
                     inadmissible: dict[int, str], se_rule: float) -> tuple[int, int, float]:
  """`(chosen, best, bar)`: the first admissible candidate within `se_rule` standard errors
  of the best admissible one."""
  ok = np.array([c not in inadmissible and np.isfinite(error[c]) for c in range(len(error))])
  ok[0] = True
  best = int(np.flatnonzero(ok)[np.argmin(error[ok])])
  bar = float(error[best] + se_rule * standard_error[best])
  chosen = int(np.flatnonzero(ok & (error <= bar + 1e-12))[0])
  return chosen, best, bar


def select(log_probs: np.ndarray, prior: np.ndarray, known: np.ndarray, fold: np.ndarray,
           decodings: Sequence[str], choice: str, settings: SelectionSettings, *,
           usable: np.ndarray | None = None) -> tuple[Selection, dict[str, np.ndarray]]:
  """Chooses a readout and a candidate for one subject (see the module docstring).

  log_probs: `[C, 120, 5]` out-of-fold known-item scores, candidate 0 = no change;
  prior: `[folds, C, 5]`; known: `int[120]` answers; fold: `int[120]`; usable: `bool[C]`
  (False: the candidate could not be computed, e.g. a stopped DPO row).
  Returns the selection and the out-of-fold predictions per decoding (`int[C, 120]`).
  """
  traits = data.load_items().trait[data.load_split().known]
  predictions = oof_predictions(log_probs, prior, known, fold, decodings)
  errors, ses = {}, {}
  for d in decodings:
    errors[d], ses[d] = composite_error(predictions[d], known, traits)
    if usable is not None:
      errors[d] = np.where(usable, errors[d], np.nan)
  decoding = choose_decoding({d: errors[d][0] for d in decodings}, list(decodings), choice)
  mass_mean, mass_low = mass_stats(log_probs, settings.mass_quantile)
  why = admissible(mass_mean, mass_low, settings, usable)
  index, best, bar = choose_candidate(errors[decoding], ses[decoding], why, settings.se_rule)
  return Selection(decoding=decoding, index=index, best=best, errors=errors,
                   standard_error=ses[decoding], bar=bar, mass_mean=mass_mean,
                   mass_low=mass_low, inadmissible=why), predictions
