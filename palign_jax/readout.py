"""The readout: how an answer 1..5 is read from the model's next-token distribution.

The scorer gives, for every question, the log-probabilities of the five option letters A..E
under the model's *full* vocabulary, `[..., 5]`. Their total probability (`letter_mass`) says
how much of its distribution the model put on a letter at all; every decoding renormalises over
the five letters (letter A is "Very Accurate", answer 5; E is "Very Inaccurate", answer 1):

* `argmax`: the most likely letter (the paper's answer).
* `median`: the median of the distribution over the answer values, the prediction that
  minimises the expected absolute error (the benchmark's metric) if the model is calibrated.
* `calibrated`, `calibrated_median`: contextual calibration (Zhao et al., 2021, "Calibrate
  Before Use"). Small models prefer some letters whatever the statement; their prior is
  measured on content-free questions (the statement replaced by "N/A", "[MASK]" and nothing)
  under the same context and steering, and divided out: `p(letter) / p_cf(letter)`,
  renormalised, then argmax or median.
* `matched`: distribution matching to the person. The model's expected answer value per item
  ranks the items; a quantile map fitted on the subject's known items (the model's scores on
  them, never computed with the item's own answer in the context, against the subject's
  answers) turns ranks into answers, so that on those items the predictions have exactly the
  subject's own answer distribution (up to ties). The map is fitted on all 120 known items
  together, not per trait: 24 items per trait give a coarse, noisy quantile function, and the
  trait and keying of an item already move the model's score for it.

A decoding that cannot be applied (no content-free scores; fewer than `MATCH_MIN_ITEMS`
answered known items or a single distinct answer to match) falls back to `median`, and
`decode` says so.
"""

from __future__ import annotations

import numpy as np

DECODINGS = ("argmax", "median", "calibrated", "calibrated_median", "matched")
FALLBACK = "median"
LETTER_VALUES = np.array([5, 4, 3, 2, 1])  # option letter A..E -> answer value
CONTENT_FREE_STATEMENTS = ("N/A", "[MASK]", "")
MATCH_MIN_ITEMS = 10  # answered known items a quantile map needs


def letter_probabilities(log_probs: np.ndarray) -> np.ndarray:
  """`[..., 5]` log-probabilities -> probabilities renormalised over the five letters."""
  log_probs = np.asarray(log_probs, np.float64)
  probs = np.exp(log_probs - log_probs.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def letter_mass(log_probs: np.ndarray) -> np.ndarray:
  """`[...]`: the probability the model gave to any of the five letters (<= 1)."""
  return np.exp(np.asarray(log_probs, np.float64)).sum(-1)


def content_free_prior(log_probs: np.ndarray) -> np.ndarray:
  """`[..., variants, 5]` content-free letter log-probabilities -> the prior `[..., 5]`: the
  mean of the renormalised distributions over the variants, as a log-probability."""
  return np.log(letter_probabilities(log_probs).mean(-2))


def calibrate(log_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
  """Divides out the content-free prior: `log p - log p_cf` (then renormalised by any use).

  log_probs: `[..., items, 5]`; prior: `[..., 5]` (one per context), broadcast over items.
  """
  return np.asarray(log_probs, np.float64) - np.asarray(prior, np.float64)[..., None, :]


def expected_value(log_probs: np.ndarray) -> np.ndarray:
  """`[...]`: the expected answer value (1..5) under the renormalised letter distribution."""
  return letter_probabilities(log_probs) @ LETTER_VALUES.astype(np.float64)


def quantile_map(train_scores: np.ndarray, train_answers: np.ndarray,
                 scores: np.ndarray) -> np.ndarray:
  """Answers for `scores` so that ranks map to the subject's own answer distribution.

  train_scores: `[n]` the model's scores on the subject's answered known items;
  train_answers: `[n]` the subject's answers there (1..5); scores: `[m]` to map.
  A score's quantile among the training scores (ties at their mid-rank) picks the answer at
  that quantile of the sorted training answers. Applied to the training scores themselves,
  the answers come out with exactly the training answers' histogram when no scores tie.
  """
  train_scores = np.asarray(train_scores, np.float64)
  order = np.sort(train_scores)
  answers_sorted = np.sort(np.asarray(train_answers))
  n = len(order)
  scores = np.asarray(scores, np.float64)
  below = np.searchsorted(order, scores, side="left")
  equal = np.searchsorted(order, scores, side="right") - below
  quantile = (below + 0.5 * equal) / n
  index = np.clip(np.floor(quantile * n).astype(int), 0, n - 1)
  return answers_sorted[index]


def can_match(train_answers: np.ndarray) -> bool:
  """Whether a subject's known answers support a quantile map (enough, and not all alike)."""
  answered = np.asarray(train_answers)
  answered = answered[answered > 0]
  return len(answered) >= MATCH_MIN_ITEMS and len(np.unique(answered)) > 1


def decode(log_probs: np.ndarray, decoding: str, *, prior: np.ndarray | None = None,
           match: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, str | None]:
  """Answers 1..5 for `[..., items, 5]` letter log-probabilities, and a note if the decoding
  fell back to `median`.

  prior: `[..., 5]` content-free log-probabilities of the same context (calibrated decodings).
  match: `(train_log_probs [n, 5], train_answers [n])` of the subject's known items, scored
    without the item's own answer in the context (`matched`); `log_probs` must then be
    `[items, 5]` for one subject.
  """
  if decoding in ("argmax", "median"):
    return answers(log_probs, decoding), None
  if decoding in ("calibrated", "calibrated_median"):
    if prior is None:
      return answers(log_probs, FALLBACK), "no content-free scores: median instead"
    base = "argmax" if decoding == "calibrated" else "median"
    return answers(calibrate(log_probs, prior), base), None
  if decoding == "matched":
    if match is None:
      return answers(log_probs, FALLBACK), "no out-of-context known-item scores: median instead"
    train_log_probs, train_answers = match
    answered = np.asarray(train_answers) > 0
    if not can_match(train_answers):
      return answers(log_probs, FALLBACK), ("too few distinct known answers to match: median "
                                            "instead")
    mapped = quantile_map(expected_value(train_log_probs[answered]),
                          np.asarray(train_answers)[answered],
                          expected_value(log_probs).ravel())
    return mapped.reshape(np.shape(log_probs)[:-1]), None
  raise ValueError(f"unknown decoding {decoding!r}; known: {', '.join(DECODINGS)}")


def answers(log_probs: np.ndarray, decoding: str = "argmax") -> np.ndarray:
  """Answers 1..5 `int[...]` from `[..., 5]` letter log-probabilities (argmax or median)."""
  if decoding == "argmax":
    return LETTER_VALUES[np.argmax(np.asarray(log_probs), axis=-1)]
  if decoding == "median":
    by_value = letter_probabilities(log_probs)[..., ::-1]  # values 1..5
    return np.argmax(np.cumsum(by_value, axis=-1) >= 0.5, axis=-1) + 1
  raise ValueError(f"unknown decoding {decoding!r} for `answers`; use argmax or median, or "
                   f"`decode` for {', '.join(DECODINGS[2:])}")
