"""Vmapped logistic probes against scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from palign_jax.pas import labels, probes

ITEMS, LAYERS, HEADS, DIM, SUBJECTS = 60, 2, 3, 16, 5


def _problem(seed=0, dim=DIM, subjects=SUBJECTS):
  """Synthetic shared vectors with a trait signal in some heads, and answers that follow
  the trait: float32 vectors, labels and the pair split of each subject."""
  rng = np.random.default_rng(seed)
  key_sign = rng.choice([-1.0, 1.0], ITEMS)
  item = rng.normal(size=(ITEMS, 1, LAYERS, HEADS, dim))
  letter = rng.normal(size=(1, 2, LAYERS, HEADS, dim))
  trait = rng.normal(size=(LAYERS, HEADS, dim)) * rng.uniform(0, 0.5, size=(LAYERS, HEADS, 1))
  agree = np.array([1.0, -1.0])[None, :, None, None, None] * key_sign[:, None, None, None, None]
  acts = 0.5 * item + 0.5 * letter + agree * trait + 0.3 * rng.normal(
      size=(ITEMS, 2, LAYERS, HEADS, dim))
  # Uneven scales across dimensions, as in real head outputs (exercises the preconditioner).
  acts = acts * np.exp(0.8 * rng.normal(size=(LAYERS, HEADS, dim)))
  level = rng.normal(size=subjects)
  answers = np.clip(np.round(3 + 1.5 * level[:, None] * key_sign + rng.normal(
      size=(subjects, ITEMS))), 1, 5).astype(int)
  answers[rng.uniform(size=answers.shape) < 0.1] = 0
  x = labels.flatten_activations(jnp.asarray(acts, jnp.float32))
  lab = labels.pair_labels(answers)
  keys = labels.subject_keys(jax.random.key(seed), jnp.arange(subjects))
  train, val = labels.train_val_split(keys, lab.labelled)
  return x, lab.labels, train, val


@pytest.fixture(scope="module")
def problem():
  return _problem()


@pytest.fixture(scope="module")
def fitted(problem):
  x, y, train, val = problem
  return probes.fit_probes(x, y, train, val)


def _sklearn(x, y, rows, c, **kwargs):
  return LogisticRegression(C=c, **kwargs).fit(x[rows].astype(np.float64), y[rows])


@pytest.mark.parametrize("c", [1.0, 0.05])
def test_probes_match_sklearn(problem, c):
  x, y, train, val = (np.asarray(a) for a in problem)
  fit = probes.fit_probes(*problem, c=c)
  assert bool(fit.converged.all())
  rng = np.random.default_rng(1)
  for _ in range(8):
    s, layer, h = rng.integers(SUBJECTS), rng.integers(LAYERS), rng.integers(HEADS)
    xs = x[:, layer, h]
    # Fully converged scikit-learn: the exact optimum of the same objective.
    ref = _sklearn(xs, y[s], train[s], c, tol=1e-10, max_iter=10_000)
    want = np.r_[ref.coef_[0], ref.intercept_]
    got = np.r_[np.asarray(fit.coef[s, layer, h]), float(fit.intercept[s, layer, h])]
    # float32 solution of a float64 problem, stopped at a scaled gradient of 1e-6.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert fit.train_accuracy[s, layer, h] == pytest.approx(
        ref.score(xs[train[s]], y[s, train[s]]), abs=1e-6)
    assert fit.val_accuracy[s, layer, h] == pytest.approx(
        ref.score(xs[val[s]], y[s, val[s]]), abs=1e-6)
    # The reference's own settings stop at scikit-learn's default tolerance, 1e-4.
    loose = _sklearn(xs, y[s], train[s], c, random_state=42, max_iter=1000)
    np.testing.assert_allclose(
        got, np.r_[loose.coef_[0], loose.intercept_], rtol=0, atol=2e-2 * np.abs(want).max())


def test_probes_match_sklearn_at_smollm2_head_dim():
  x, y, train, val = _problem(seed=2, dim=64, subjects=2)
  fit = probes.fit_probes(x, y, train, val)
  x, y, train, val = (np.asarray(a) for a in (x, y, train, val))
  for s, layer, h in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
    ref = _sklearn(x[:, layer, h], y[s], train[s], 1.0, tol=1e-10, max_iter=10_000)
    want = np.r_[ref.coef_[0], ref.intercept_]
    got = np.r_[np.asarray(fit.coef[s, layer, h]), float(fit.intercept[s, layer, h])]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert fit.val_accuracy[s, layer, h] == pytest.approx(
        ref.score(x[val[s], layer, h], y[s, val[s]]), abs=1e-6)


def test_batched_subjects_equal_each_subject_alone(problem, fitted):
  x, y, train, val = problem
  for s in range(SUBJECTS):
    alone = probes.fit_probes(x, y[s:s + 1], train[s:s + 1], val[s:s + 1])
    np.testing.assert_allclose(alone.coef[0], fitted.coef[s], rtol=0, atol=1e-4)
    np.testing.assert_allclose(alone.intercept[0], fitted.intercept[s], rtol=0, atol=1e-4)
    # One flipped prediction would move an accuracy by at least 1/144.
    np.testing.assert_allclose(alone.train_accuracy[0], fitted.train_accuracy[s], atol=1e-6)
    np.testing.assert_allclose(alone.val_accuracy[0], fitted.val_accuracy[s], atol=1e-6)


def test_head_chunks_give_the_same_probes(problem, fitted):
  chunked = probes.fit_probes(*problem, head_chunk=2)
  np.testing.assert_allclose(chunked.coef, fitted.coef, rtol=0, atol=1e-4)
  np.testing.assert_allclose(chunked.val_accuracy, fitted.val_accuracy, atol=1e-6)
  np.testing.assert_allclose(chunked.train_accuracy, fitted.train_accuracy, atol=1e-6)


def test_subject_without_training_vectors_gives_zero_probe(problem):
  x, y, train, val = problem
  train = train.at[1].set(False)
  val = val.at[1].set(False)
  fit = probes.fit_probes(x, y, train, val)
  assert np.isfinite(np.asarray(fit.coef)).all()
  np.testing.assert_array_equal(fit.coef[1], 0.0)
  np.testing.assert_array_equal(fit.train_accuracy[1], 0.0)
  np.testing.assert_array_equal(fit.val_accuracy[1], 0.0)


def test_score_is_mean_of_train_and_val_accuracy(fitted):
  np.testing.assert_allclose(fitted.score,
                             (fitted.train_accuracy + fitted.val_accuracy) / 2)
