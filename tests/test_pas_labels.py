"""PAS labels, input checks and the train/validation split, on hand-made subjects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.pas import labels


def test_pair_labels_hand_made_subjects():
  answers = np.array([
      [5, 4, 3, 2, 1, 0],  # mixed
      [3, 3, 3, 3, 3, 3],  # all neutral
      [0, 0, 0, 0, 0, 0],  # all missing
      [4, 5, 4, 5, 5, 4],  # only high answers
  ])
  got = labels.pair_labels(answers)
  # Vector 2 * i is item i answered "A", 2 * i + 1 the same item answered "E".
  np.testing.assert_array_equal(got.labels, [
      [1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0],
      [0] * 12,
      [0] * 12,
      [1, 0] * 6,
  ])
  np.testing.assert_array_equal(got.labelled, np.array([
      [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0],
      [0] * 12,
      [0] * 12,
      [1] * 12,
  ], bool))


def test_flatten_activations_index_is_two_i_plus_v():
  acts = np.arange(5 * 2 * 3 * 2 * 4, dtype=np.float32).reshape(5, 2, 3, 2, 4)
  flat = labels.flatten_activations(jnp.asarray(acts))
  assert flat.shape == (10, 3, 2, 4)
  for i in range(5):
    for v in range(2):
      np.testing.assert_array_equal(flat[2 * i + v], acts[i, v])


@pytest.mark.parametrize("answers, where", [
    ([[1, 2, 6]], "subject 0, item 2"),
    ([[1, 2, 3], [1, -1, 3]], "subject 1, item 1"),
    ([[1.0, 2.5, 3.0]], "subject 0, item 1"),
    ([[1.0, np.nan, 3.0]], "subject 0, item 1"),
    ([1, 2, 3], "shape"),
    ([["a", "b", "c"]], "dtype"),
])
def test_check_known_answers_rejects_bad_values(answers, where):
  with pytest.raises(UserInputError, match=where):
    labels.check_known_answers(np.array(answers))


def test_check_known_answers_item_count_and_float_integers():
  with pytest.raises(UserInputError, match="4 items, but the activations have 3"):
    labels.check_known_answers(np.ones((2, 4), int), num_items=3)
  got = labels.check_known_answers(np.array([[1.0, 0.0, 5.0]]))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, [[1, 0, 5]])


def test_check_activations_names_the_nan():
  acts = np.zeros((4, 2, 3, 2, 5), np.float32)
  acts[2, 1, 1, 0, 3] = np.nan
  with pytest.raises(UserInputError, match="item 2, version E, layer 1, head 0, dim 3"):
    labels.check_activations(jnp.asarray(acts))
  with pytest.raises(UserInputError, match="shape"):
    labels.check_activations(jnp.zeros((4, 3, 3, 2, 5)))
  labels.check_activations(jnp.zeros((4, 2, 3, 2, 5)))


def _split(answers, split_by, key=0, ids=None):
  lab = labels.pair_labels(np.asarray(answers))
  ids = jnp.arange(len(answers)) if ids is None else jnp.asarray(ids)
  keys = labels.subject_keys(jax.random.key(key), ids)
  train, val = labels.train_val_split(keys, lab.labelled, split_by=split_by)
  return lab, np.asarray(train), np.asarray(val)


def _answers(num_subjects=6, num_items=40, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 6, size=(num_subjects, num_items))


def test_pair_split_keeps_pairs_together_with_reference_sizes():
  answers = _answers()
  lab, train, val = _split(answers, "pairs")
  labelled = np.asarray(lab.labelled)
  assert not (train & val).any()
  np.testing.assert_array_equal(train | val, labelled)
  np.testing.assert_array_equal(train[:, 0::2], train[:, 1::2])
  items = labelled[:, 0::2].sum(1)
  # The reference's size rule: int(0.6 * n) train units, the rest validate.
  np.testing.assert_array_equal(train[:, 0::2].sum(1), (0.6 * items + 1e-9).astype(int))
  # Every training and validation item brings one vector of each class.
  y = np.asarray(lab.labels)
  np.testing.assert_array_equal((y * train).sum(1), train.sum(1) // 2)
  np.testing.assert_array_equal((y * val).sum(1), val.sum(1) // 2)


def test_vector_split_sizes_and_coverage():
  answers = _answers()
  lab, train, val = _split(answers, "vectors")
  labelled = np.asarray(lab.labelled)
  assert not (train & val).any()
  np.testing.assert_array_equal(train | val, labelled)
  n = labelled.sum(1)
  np.testing.assert_array_equal(train.sum(1), (0.6 * n + 1e-9).astype(int))
  # Vector splits separate some pairs (that is the leakage the pair split avoids).
  assert (train[:, 0::2] != train[:, 1::2]).any()


def test_split_is_seeded_per_subject_not_per_batch():
  answers = _answers()
  _, train, _ = _split(answers, "pairs", key=3)
  _, again, _ = _split(answers, "pairs", key=3)
  np.testing.assert_array_equal(train, again)
  _, other_key, _ = _split(answers, "pairs", key=4)
  assert (train != other_key).any()
  # Subject 4 alone, with its id, gets the split it had in the batch.
  _, alone, _ = _split(answers[4:5], "pairs", key=3, ids=[4])
  np.testing.assert_array_equal(alone[0], train[4])
  # Identical answers under different ids get different splits.
  _, twins, _ = _split(np.stack([answers[0], answers[0]]), "pairs", key=3)
  assert (twins[0] != twins[1]).any()


def test_split_of_subjects_without_labels_is_empty():
  answers = np.array([[3] * 10, [0] * 10, [5] + [3] * 9])
  _, train, val = _split(answers, "pairs")
  assert not train[:2].any() and not val[:2].any()
  # One labelled item: int(0.6) = 0 to train, the item validates.
  assert not train[2].any() and val[2].sum() == 2
