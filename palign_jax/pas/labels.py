"""PAS labels: the shared-activation layout, per-subject labels and the probe train/val split.

The activation set is shared by all subjects: for each known item the model is run
with the assistant answer "A" (Very Accurate) and with "E" (Very Inaccurate), and each
head's output at the answer token is recorded:

  activations: float[items, 2, layers, heads, head_dim]   ([:, 0] = "A", [:, 1] = "E")

Flattened, vector `2 * i + v` is item `i`, version `v` (`[2 * items, layers, heads, head_dim]`).
A subject's answers label those vectors (the reference's rule): an answer of 4-5 labels
the "A" vector 1 and the "E" vector 0, an answer of 1-2 the other way round, and an
answer of 3 or 0 (missing) leaves both vectors unlabelled. Every labelled item therefore
gives one vector of each class. Subjects label different numbers of vectors, so
everything here is a dense `[subjects, 2 * items]` array plus a boolean mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax.errors import input_error

VERSIONS = 2  # "A" then "E"
SPLITS = ("pairs", "vectors")


class Labels(NamedTuple):
  """Per-subject labels of the flattened vectors (index `2 * item + version`)."""

  labels: jax.Array  # int32[subjects, 2 * items]: 1 or 0; 0 where unlabelled
  labelled: jax.Array  # bool[subjects, 2 * items]


def check_known_answers(known_answers, *, num_items: int | None = None,
                        source: str = "known_answers") -> np.ndarray:
  """Returns `known_answers` as `int32[subjects, items]`, or raises `UserInputError`.

  Answers must be integers 0..5 (0 = missing). `num_items`, when given, is the number
  of items the activation set has.
  """
  answers = np.asarray(known_answers)
  if answers.ndim != 2:
    raise input_error(source, "shape", f"expected [subjects, items], got {answers.shape}")
  if num_items is not None and answers.shape[1] != num_items:
    raise input_error(source, "shape",
                      f"{answers.shape[1]} items, but the activations have {num_items}")
  if answers.dtype.kind not in "iub":
    if answers.dtype.kind != "f":
      raise input_error(source, "dtype", f"expected integer answers, got {answers.dtype}")
    bad = ~np.isfinite(answers) | (answers != np.round(answers))
    if bad.any():
      s, i = np.argwhere(bad)[0]
      raise input_error(source, f"subject {s}, item {i}",
                        f"answer {answers[s, i]!r} is not an integer")
  bad = (answers < 0) | (answers > 5)
  if bad.any():
    s, i = np.argwhere(bad)[0]
    raise input_error(source, f"subject {s}, item {i}",
                      f"answer {answers[s, i]!r} is outside 0..5 (0 = missing)")
  return answers.astype(np.int32)


def check_activations(activations, *, source: str = "activations") -> None:
  """Raises `UserInputError` unless `activations` is finite `[items, 2, layers, heads, dim]`."""
  shape = tuple(activations.shape)
  if len(shape) != 5 or shape[1] != VERSIONS:
    raise input_error(source, "shape",
                      f"expected [items, 2, layers, heads, head_dim], got {shape}")
  if not jnp.issubdtype(activations.dtype, jnp.floating):
    raise input_error(source, "dtype", f"expected floating point, got {activations.dtype}")
  finite = np.asarray(jnp.isfinite(activations).all(axis=(2, 3, 4)))
  if not finite.all():
    item, version = np.argwhere(~finite)[0]
    bad = np.asarray(activations[item, version])
    layer, head, dim = np.argwhere(~np.isfinite(bad))[0]
    raise input_error(source, f"item {item}, version {'AE'[version]}, layer {layer}, "
                      f"head {head}, dim {dim}", f"value {bad[layer, head, dim]} is not finite")


def flatten_activations(activations: jax.Array) -> jax.Array:
  """`[items, 2, layers, heads, dim]` -> `[2 * items, layers, heads, dim]`, index `2 * i + v`."""
  return activations.reshape((-1,) + activations.shape[2:])


def pair_labels(known_answers: jax.Array) -> Labels:
  """Labels the flattened vectors from answers `int[subjects, items]` (1..5, 0 = missing)."""
  answers = jnp.asarray(known_answers)
  high = answers >= 4
  labelled_item = high | ((answers >= 1) & (answers <= 2))
  # Version "A" takes label `high`, version "E" the opposite.
  labels = jnp.stack([high, ~high], axis=-1) & labelled_item[..., None]
  labelled = jnp.stack([labelled_item, labelled_item], axis=-1)
  flat = lambda a: a.reshape(a.shape[:-2] + (-1,))
  return Labels(labels=flat(labels).astype(jnp.int32), labelled=flat(labelled))


def subject_keys(key: jax.Array, subject_ids: jax.Array) -> jax.Array:
  """One key per subject, from the subject's id, so a subject's split does not depend on
  which other subjects share its batch or device."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(subject_ids)


def train_val_split(keys: jax.Array, labelled: jax.Array, *, val_fraction: float = 0.4,
                    split_by: str = "pairs") -> tuple[jax.Array, jax.Array]:
  """Random train/validation masks over each subject's labelled vectors.

  Args:
    keys: one PRNG key per subject (`subject_keys`).
    labelled: `bool[subjects, 2 * items]`.
    val_fraction: the share of units held out; as in the reference, the train set gets
      `floor((1 - val_fraction) * n)` of the subject's `n` labelled units, the rest validate.
    split_by: "pairs" (default) splits items, keeping an item's "A" and "E" vectors on
      the same side; "vectors" splits single vectors, as the reference does.

  Why pairs: an item's two vectors share the whole prompt and differ only in the answer
  letter, so with a vector split the probe has usually trained on the validation
  vector's twin, which inflates validation accuracy, the score the heads are ranked by.
  Splitting pairs also keeps both sets exactly balanced (one vector of each class per
  item), so a subject with at least one training item always has both classes.

  Returns:
    `(train, val)`, each `bool[subjects, 2 * items]`, disjoint, covering `labelled`.
  """
  if split_by not in SPLITS:
    raise ValueError(f"split_by must be one of {SPLITS}, got {split_by!r}")
  if split_by == "pairs":
    units = labelled.reshape(labelled.shape[:-1] + (-1, VERSIONS))[..., 0]
  else:
    units = labelled
  n = units.sum(axis=-1, keepdims=True)
  # float32 floor of (1 - f) * n; the tiny slack keeps exact products (0.6 * 5 = 3) whole.
  n_train = jnp.floor((1.0 - val_fraction) * n + 1e-4).astype(n.dtype)
  scores = jax.vmap(lambda k: jax.random.uniform(k, units.shape[-1:]))(keys)
  scores = jnp.where(units, scores, jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  train_units = units & (rank < n_train)
  if split_by == "pairs":
    train_units = jnp.repeat(train_units, VERSIONS, axis=-1)
  train = train_units & labelled
  return train, labelled & ~train
