"""How many heads are kept, and which: exact ranking, ties broken without an index bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.pas import heads, labels


def keys(n, seed=0):
  return labels.subject_keys(jax.random.key(seed), jnp.arange(n))


def test_higher_scores_always_win():
  scores = jnp.array([[[0.5, 0.9, 0.1], [0.7, 0.2, 0.8]],
                      [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
  mask = np.asarray(heads.select_top_heads(scores, 3, keys(2)))
  np.testing.assert_array_equal(mask[0], [[0, 1, 0], [1, 0, 1]])
  np.testing.assert_array_equal(mask[1], [[0, 0, 0], [1, 1, 1]])


def test_ties_are_broken_at_random_but_reproducibly():
  scores = jnp.array([[[0.6, 0.6, 0.6], [0.6, 0.9, 0.6]]] * 64)
  mask = np.asarray(heads.select_top_heads(scores, 3, keys(64)))
  assert (mask.sum(axis=(1, 2)) == 3).all() and mask[:, 1, 1].all()  # the 0.9 head always
  assert len({m.tobytes() for m in mask}) > 5  # the two tied places differ between subjects
  again = np.asarray(heads.select_top_heads(scores, 3, keys(64)))
  np.testing.assert_array_equal(again, mask)
  other = np.asarray(heads.select_top_heads(scores, 3, keys(64, seed=1)))
  assert not np.array_equal(other, mask)


def test_tied_heads_are_not_biased_towards_early_layers():
  """Head scores move in steps of 1/(validation size), so ties are the rule. With every head
  tied, each must be kept as often as any other: in particular the mean layer of the kept
  heads is the middle layer, not the first ones (the lowest-index rule's bias)."""
  layers, per_layer, k, subjects = 30, 9, 24, 4000
  rng = np.random.default_rng(0)
  # Scores on a coarse grid (1/10 steps): many ties within and across layers.
  scores = jnp.asarray(rng.integers(7, 9, (subjects, layers, per_layer)) / 10, jnp.float32)
  mask = np.asarray(heads.select_top_heads(scores, k, keys(subjects)))
  assert (mask.sum(axis=(1, 2)) == k).all()
  top = np.asarray(scores) == 0.8
  # Among the top-scoring heads, the kept share must not depend on the layer.
  share = (mask & top).sum(axis=(0, 2)) / top.sum(axis=(0, 2))
  assert share.std() < 0.01, share
  kept_layer = np.nonzero(mask & top)[1]
  all_layer = np.nonzero(top)[1]
  assert abs(kept_layer.mean() - all_layer.mean()) < 0.2
  # The lowest-index rule would keep layers 0-4 almost only: a test that can tell.
  lowest = np.argsort(np.argsort(-np.asarray(scores).reshape(subjects, -1), axis=-1,
                                 kind="stable"), axis=-1) < k
  assert np.nonzero(lowest.reshape(mask.shape))[1].mean() < all_layer.mean() - 5


@pytest.mark.parametrize("count, fraction, total, want", [
    (24, None, 270, 24), (1, None, 6, 1), (6, None, 6, 6), (24, 0.1, 270, 27),
    (None, 1.0, 270, 270), (None, 0.001, 270, 1),
])
def test_resolve_top_k(count, fraction, total, want):
  assert heads.resolve_top_k(count, fraction, total) == want


@pytest.mark.parametrize("count, fraction, field", [
    (0, None, "top_k"), (271, None, "top_k"), (-3, None, "top_k"), (1.0, None, "top_k"),
    (True, None, "top_k"), ("24", None, "top_k"), (None, None, "top_k"),
    (24, 0.0, "top_k_fraction"), (24, 1.5, "top_k_fraction"), (24, 24, "top_k_fraction"),
])
def test_resolve_top_k_rejects(count, fraction, field):
  with pytest.raises(UserInputError, match=f"config.pas.{field}"):
    heads.resolve_top_k(count, fraction, 270, source="config.pas")
