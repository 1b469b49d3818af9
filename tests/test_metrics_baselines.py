"""Tests of the PAPI metric (hand-computed cases) and of the non-LLM baselines."""

import json
import subprocess
import sys

import numpy as np
import pytest

from palign_jax import data
from palign_jax.evaluation import baselines, metrics


def test_trait_errors_hand_computed():
  # Two held-out items per trait (A, C, E, N, O order), 2 subjects.
  items = data.load_items()
  heldout = np.concatenate([np.flatnonzero(items.trait == t)[:2] for t in range(5)])
  answers = np.zeros((2, 300), np.int64)
  answers[0, heldout] = [5, 1, 3, 3, 2, 2, 4, 4, 1, 5]
  answers[1, heldout] = [3, 0, 3, 3, 3, 3, 3, 3, 3, 3]  # one missing answer in A
  predictions = np.array([[4, 1, 3, 1, 5, 5, 4, 0, 5, 1],
                          [1, 5, 3, 3, 3, 3, 3, 3, 3, 3]])
  result = metrics.trait_errors(["s0", "s1"], predictions, answers, heldout)
  np.testing.assert_allclose(result.errors[0], [0.5, 1.0, 3.0, 0.0, 4.0])
  np.testing.assert_allclose(result.errors[1], [2.0, 0.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(result.composite, [8.5, 2.0])
  assert result.n_unparsable.tolist() == [1, 0]  # the 0 prediction is counted, not hidden
  assert result.n_missing_answers.tolist() == [0, 1]


def test_summary_and_bootstrap_against_numpy():
  rng = np.random.default_rng(1)
  errors = rng.uniform(0, 2, size=(40, 5))
  result = metrics.SubjectErrors(tuple(map(str, range(40))), errors, np.zeros(40, int),
                                 np.zeros(40, int))
  summary = metrics.summarize(result, n_bootstrap=500, seed=3)
  np.testing.assert_allclose(summary.mean["sum"], errors.sum(1).mean())
  np.testing.assert_allclose(summary.mean["A"], errors[:, 0].mean())
  draws = np.random.default_rng(3).integers(0, 40, size=(500, 40))
  boot = errors.sum(1)[draws].mean(1)
  np.testing.assert_allclose([summary.ci_low["sum"], summary.ci_high["sum"]],
                             np.percentile(boot, [2.5, 97.5]))
  assert summary.ci_low["sum"] < summary.mean["sum"] < summary.ci_high["sum"]


@pytest.mark.parametrize("value,expected", [
    (3, [0.708, 0.718, 0.752, 0.723, 0.891, 3.792]),
    (4, [0.774, 0.672, 0.780, 1.174, 0.635, 4.035]),
])
def test_constant_baselines_reproduce_papi_readme(value, expected):
  subjects = data.load_papi_subjects()
  predictions = baselines.predict(f"constant_{value}", subjects.answers)
  summary = metrics.summarize(metrics.trait_errors(subjects.ids, predictions, subjects.answers))
  got = [summary.mean[k] for k in list(data.TRAITS) + ["sum"]]
  np.testing.assert_allclose(got, expected, atol=5e-4)


def test_item_mean_is_leave_one_subject_out():
  subjects = data.load_papi_subjects()
  heldout = data.load_split().heldout
  predictions = baselines.item_mean_loso(subjects.answers, heldout)
  # Reference: explicit loop for a few subjects.
  for s in (0, 17, 299):
    others = np.delete(subjects.answers[:, heldout], s, axis=0).astype(float)
    means = np.nanmean(np.where(others > 0, others, np.nan), axis=0)
    np.testing.assert_array_equal(predictions[s], np.clip(np.floor(means + 0.5), 1, 5))
  # Changing one subject's held-out answers does not change its own predictions.
  changed = subjects.answers.copy()
  changed[0, heldout] = 1
  np.testing.assert_array_equal(baselines.item_mean_loso(changed, heldout)[0], predictions[0])


def test_ridge_matches_closed_form_and_ignores_own_heldout_answers():
  rng = np.random.default_rng(0)
  x = rng.integers(1, 6, size=(50, 8))
  y = rng.integers(1, 6, size=(50, 3))
  # Reference ridge with an unpenalised intercept in float64 via an augmented solve.
  strength = 10.0
  design = np.concatenate([x, np.ones((50, 1))], axis=1).astype(float)
  penalty = strength * np.diag([1.0] * 8 + [0.0])
  w = np.linalg.solve(design.T @ design + penalty, design.T @ y)
  np.testing.assert_allclose(baselines.ridge_fit_predict(x, y, x[:5], strength),
                             design[:5] @ w, rtol=1e-9, atol=1e-9)
  subjects = data.load_papi_subjects()
  split = data.load_split()
  predictions = baselines.ridge_cv(subjects.answers, split.known, split.heldout, seed=0)
  changed = subjects.answers.copy()
  changed[5, split.heldout] = 1
  again = baselines.ridge_cv(changed, split.known, split.heldout, seed=0)
  fold_of_5 = np.array_split(np.random.default_rng(0).permutation(300), 10)
  same_fold = next(f for f in fold_of_5 if 5 in f)
  np.testing.assert_array_equal(again[same_fold], predictions[same_fold])


def test_baselines_cli_writes_json(tmp_path):
  out = tmp_path / "b.json"
  proc = subprocess.run([sys.executable, "-m", "launch.baselines", f"--output={out}",
                         "--methods=constant_3,item_mean_loso"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert "constant_3" in proc.stdout
  result = json.loads(out.read_text())
  assert set(result) == {"constant_3", "item_mean_loso"}
  assert set(result["constant_3"]) == {"A", "C", "E", "N", "O", "sum"}
  assert abs(result["constant_3"]["sum"] - 3.792) < 5e-4


def test_baselines_cli_bad_flag_has_no_traceback():
  proc = subprocess.run([sys.executable, "-m", "launch.baselines", "--methods=nope"],
                        capture_output=True, text=True)
  assert proc.returncode == 2
  assert "unknown baseline" in proc.stderr and "Traceback" not in proc.stderr
