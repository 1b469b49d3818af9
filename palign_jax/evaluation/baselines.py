"""Non-LLM baselines: the floor every model result is reported beside.

Each baseline maps subjects' known answers (and, for the learned ones, other
subjects' full answers) to integer predictions 1..5 for the 180 held-out
items, so they are scored exactly like a model's letter answers:

* `constant_k`: always answer k (k = 1..5).
* `item_mean_loso`: each item's mean answer over the *other* subjects
  (leave-one-subject-out), rounded to the nearest answer.
* `ridge_cv`: ridge regression from a subject's 120 known answers to the 180
  held-out answers, fitted across subjects with 10-fold cross-validation over
  subjects (the ridge strength is chosen by an inner cross-validation on the
  training folds only), rounded and clipped to 1..5.

No baseline reads the evaluated subject's held-out answers.
"""

from __future__ import annotations

import numpy as np

from palign_jax import data

RIDGE_STRENGTHS = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)


def constant(answers: np.ndarray, value: int, heldout: np.ndarray) -> np.ndarray:
  """`int[subjects, heldout]` filled with `value`."""
  return np.full((len(answers), len(heldout)), value, np.int64)


def item_mean_loso(answers: np.ndarray, heldout: np.ndarray) -> np.ndarray:
  """Each held-out item's mean over the other subjects' non-missing answers, rounded."""
  values = answers[:, heldout].astype(np.float64)
  answered = values > 0
  total, count = values.sum(axis=0), answered.sum(axis=0)
  others_total = total[None, :] - values
  others_count = count[None, :] - answered
  mean = others_total / np.maximum(others_count, 1)
  return to_answer(np.where(others_count > 0, mean, 3.0))


def item_mean(reference: np.ndarray, heldout: np.ndarray) -> np.ndarray:
  """`int[heldout]`: each item's rounded mean over all `reference` subjects (for outsiders)."""
  return to_answer(_column_means(reference[:, heldout]))


def to_answer(values: np.ndarray) -> np.ndarray:
  """Rounds real-valued predictions to answers 1..5 (half away from the centre)."""
  return np.clip(np.floor(np.asarray(values) + 0.5), 1, 5).astype(np.int64)


def _impute(x: np.ndarray, fill: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return np.where(x > 0, x, fill[None, :])


def _column_means(x: np.ndarray) -> np.ndarray:
  answered = x > 0
  return np.where(answered.any(0), (x * answered).sum(0) / np.maximum(answered.sum(0), 1), 3.0)


def ridge_fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      strength: float) -> np.ndarray:
  """Ridge regression (intercept unpenalised) in float64; missing answers imputed.

  Args:
    train_x: `int[n, known]` known answers of training subjects (0 = missing).
    train_y: `int[n, heldout]` their held-out answers (0 = missing).
    test_x: `int[m, known]` known answers of the subjects to predict.
  Returns: `float[m, heldout]` real-valued predictions.
  """
  x_fill, y_fill = _column_means(train_x), _column_means(train_y)
  x, y = _impute(train_x, x_fill), _impute(train_y, y_fill)
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc = x - x_mean
  gram = xc.T @ xc + strength * np.eye(x.shape[1])
  weights = np.linalg.solve(gram, xc.T @ (y - y_mean))
  return (_impute(test_x, x_fill) - x_mean) @ weights + y_mean


def _folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
  return np.array_split(rng.permutation(n), min(k, n))


def _mae(predicted: np.ndarray, actual: np.ndarray) -> float:
  valid = actual > 0
  return float(np.abs(to_answer(predicted) - actual)[valid].mean())


def choose_ridge_strength(x: np.ndarray, y: np.ndarray, seed: int, k: int = 5) -> float:
  """Picks the strength with the lowest cross-validated error on these subjects only."""
  folds = _folds(len(x), k, np.random.default_rng(seed))
  scores = []
  for strength in RIDGE_STRENGTHS:
    errors = []
    for fold in folds:
      train = np.setdiff1d(np.arange(len(x)), fold)
      errors.append(_mae(ridge_fit_predict(x[train], y[train], x[fold], strength), y[fold]))
    scores.append(np.mean(errors))
  return RIDGE_STRENGTHS[int(np.argmin(scores))]


def ridge_cv(answers: np.ndarray, known: np.ndarray, heldout: np.ndarray, *, seed: int = 0,
             folds: int = 10) -> np.ndarray:
  """Out-of-fold ridge predictions for every subject, `int[subjects, heldout]`."""
  x, y = answers[:, known], answers[:, heldout]
  predictions = np.zeros(y.shape, np.int64)
  for n, fold in enumerate(_folds(len(x), folds, np.random.default_rng(seed))):
    train = np.setdiff1d(np.arange(len(x)), fold)
    strength = choose_ridge_strength(x[train], y[train], seed=seed + n + 1)
    predictions[fold] = to_answer(ridge_fit_predict(x[train], y[train], x[fold], strength))
  return predictions


def ridge_for_new_subjects(reference: np.ndarray, new_answers: np.ndarray, known: np.ndarray,
                           heldout: np.ndarray, *, seed: int = 0) -> np.ndarray:
  """Ridge fitted on all `reference` subjects, predicting subjects outside that set."""
  x, y = reference[:, known], reference[:, heldout]
  strength = choose_ridge_strength(x, y, seed=seed)
  return to_answer(ridge_fit_predict(x, y, new_answers[:, known], strength))


BASELINE_METHODS = ("constant_1", "constant_2", "constant_3", "constant_4", "constant_5",
                    "item_mean_loso", "ridge_cv")


def predict(method: str, answers: np.ndarray, *, seed: int = 0,
            split: data.Split | None = None) -> np.ndarray:
  """Held-out predictions of a baseline for subjects that are all in `answers`."""
  split = split or data.load_split()
  if method.startswith("constant_"):
    return constant(answers, int(method.removeprefix("constant_")), split.heldout)
  if method == "item_mean_loso":
    return item_mean_loso(answers, split.heldout)
  if method == "ridge_cv":
    return ridge_cv(answers, split.known, split.heldout, seed=seed)
  raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINE_METHODS)}")
