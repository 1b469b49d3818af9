"""The readout: how an answer 1..5 is read from the model's next-token distribution.

The scorer gives, for every question, the log-probabilities of the five option letters A..E
under the model's *full* vocabulary, `[..., 5]`. Their total probability (`letter_mass`) says
how much of its distribution the model put on a letter at all; a decoding renormalises over
the five letters and picks an answer:

* `argmax`: the most likely letter (the paper's answer);
* `median`: the median of the distribution over the answer values 1..5, the prediction that
  minimises the expected absolute error (the benchmark's metric).

Letter A is "Very Accurate" (answer 5), E is "Very Inaccurate" (answer 1).
"""

from __future__ import annotations

import numpy as np

DECODINGS = ("argmax", "median")
LETTER_VALUES = np.array([5, 4, 3, 2, 1])  # option letter A..E -> answer value


def letter_probabilities(log_probs: np.ndarray) -> np.ndarray:
  """`[..., 5]` log-probabilities -> probabilities renormalised over the five letters."""
  log_probs = np.asarray(log_probs, np.float64)
  probs = np.exp(log_probs - log_probs.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def letter_mass(log_probs: np.ndarray) -> np.ndarray:
  """`[...]`: the probability the model gave to any of the five letters (<= 1)."""
  return np.exp(np.asarray(log_probs, np.float64)).sum(-1)


def answers(log_probs: np.ndarray, decoding: str = "argmax") -> np.ndarray:
  """Answers 1..5 `int[...]` from `[..., 5]` letter log-probabilities."""
  if decoding == "argmax":
    return LETTER_VALUES[np.argmax(np.asarray(log_probs), axis=-1)]
  if decoding == "median":
    by_value = letter_probabilities(log_probs)[..., ::-1]  # values 1..5
    return np.argmax(np.cumsum(by_value, axis=-1) >= 0.5, axis=-1) + 1
  raise ValueError(f"unknown decoding {decoding!r}; known: {', '.join(DECODINGS)}")
