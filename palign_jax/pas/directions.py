"""PAS directions and steering tensors: the whole per-subject fit from shared activations.

For each subject: label the shared vectors (`labels`), fit a probe per head and keep the
top K heads (`probes`), then for every head take the mass-mean direction (mean of the
label-1 vectors minus mean of the label-0 vectors, over all the subject's labelled
vectors, unit length) and sigma, the standard deviation (ddof=0, as the reference's
`np.std`) of those labelled vectors projected on it. Steering adds
`alpha * sigma * direction` to the kept heads' outputs before `o_proj`.

A subject is `valid` when it has at least `min_items` labelled items (answers other than
3 and missing) and its split leaves both classes in training and something to validate.
Invalid subjects (all answers 3 or missing, too few items) get no kept heads, zero
directions and sigma, hence zero steering for every alpha: they run unsteered.

Everything is one `jit` over a leading subjects axis, which may be sharded over a mesh.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax.errors import input_error
from palign_jax.pas import labels as labels_lib
from palign_jax.pas import probes as probes_lib

DEFAULT_TOP_K = 24  # the reference's num_to_intervene
DEFAULT_MIN_ITEMS = 2  # one item to train on, one to validate


class PasFit(NamedTuple):
  """Per-subject PAS fit; every field has the subjects axis first."""

  head_mask: jax.Array  # bool[S, L, H]: the kept (top-K) heads; all False if not valid
  directions: jax.Array  # float32[S, L, H, D]: unit mass-mean directions, every head
  sigma: jax.Array  # float32[S, L, H]: std (ddof=0) of labelled vectors along directions
  train_accuracy: jax.Array  # float32[S, L, H]
  val_accuracy: jax.Array  # float32[S, L, H]
  probe_coef: jax.Array  # float32[S, L, H, D]
  probe_intercept: jax.Array  # float32[S, L, H]
  probe_converged: jax.Array  # bool[S, L, H]
  num_labelled: jax.Array  # int32[S]: labelled vectors, 2 per labelled item (0..2 * items)
  valid: jax.Array  # bool[S]

  @property
  def head_score(self) -> jax.Array:
    """`[S, L, H]` the ranking score: mean of training and validation accuracy."""
    return 0.5 * (self.train_accuracy + self.val_accuracy)


def mass_mean_directions(vectors: jax.Array, labels: jax.Array,
                         labelled: jax.Array) -> jax.Array:
  """Unit `mean(label 1) - mean(label 0)` per subject and head.

  Args:
    vectors: `float[N, L, H, D]`; labels `int[S, N]`; labelled `bool[S, N]`.

  Returns:
    `float32[S, L, H, D]`; zero where a subject lacks a class or the means coincide.
  """
  x = vectors.astype(jnp.float32)
  flat = x.reshape(x.shape[0], -1)
  ones = (labelled & (labels == 1)).astype(jnp.float32)
  zeros = (labelled & (labels == 0)).astype(jnp.float32)
  mean = lambda w: (w @ flat) / jnp.maximum(w.sum(axis=-1, keepdims=True), 1.0)
  both = (ones.sum(axis=-1) > 0) & (zeros.sum(axis=-1) > 0)
  diff = (mean(ones) - mean(zeros)).reshape((-1,) + x.shape[1:])
  norm = jnp.linalg.norm(diff, axis=-1, keepdims=True)
  ok = (norm > 0) & both[:, None, None, None]
  return jnp.where(ok, diff / jnp.where(ok, norm, 1.0), 0.0)


def projection_std(vectors: jax.Array, directions: jax.Array, labelled: jax.Array) -> jax.Array:
  """`[S, L, H]` std (ddof=0) over each subject's labelled vectors of `x . direction`; 0 if
  the subject has none."""
  x = vectors.astype(jnp.float32)
  proj = jnp.einsum("nlhd,slhd->snlh", x, directions)
  w = labelled.astype(jnp.float32)[:, :, None, None]
  count = jnp.maximum(w.sum(axis=1), 1.0)
  mean = (w * proj).sum(axis=1) / count
  # Two passes (deviations from the mean) keep float32 accurate.
  return jnp.sqrt((w * (proj - mean[:, None]) ** 2).sum(axis=1) / count)


# Only what changes shapes or code is static; numbers stay traced so that changing them
# does not recompile.
@functools.partial(jax.jit, static_argnames=("split_by", "head_chunk"))
def _fit_pas(activations, known_answers, key, subject_ids, *, top_k, c, val_fraction,
             split_by, min_items, max_iter, tol, head_chunk) -> PasFit:
  x = labels_lib.flatten_activations(activations).astype(jnp.float32)
  lab = labels_lib.pair_labels(known_answers.astype(jnp.int32))
  keys = labels_lib.subject_keys(key, subject_ids)
  train, val = labels_lib.train_val_split(keys, lab.labelled, val_fraction=val_fraction,
                                          split_by=split_by)
  num_labelled = lab.labelled.sum(axis=-1).astype(jnp.int32)
  has = lambda mask, cls: jnp.any(mask & (lab.labels == cls), axis=-1)
  valid = ((num_labelled >= 2 * min_items) & has(train, 0) & has(train, 1)
           & jnp.any(val, axis=-1))
  # Invalid subjects fit nothing: with empty masks their probes start converged.
  train = train & valid[:, None]
  val = val & valid[:, None]
  probes = probes_lib.fit_probes(x, lab.labels, train, val, c=c, max_iter=max_iter,
                                 tol=tol, head_chunk=head_chunk)
  head_mask = probes_lib.select_top_heads(probes.score, top_k) & valid[:, None, None]
  labelled = lab.labelled & valid[:, None]
  directions = mass_mean_directions(x, lab.labels, labelled)
  return PasFit(
      head_mask=head_mask, directions=directions,
      sigma=projection_std(x, directions, labelled),
      train_accuracy=probes.train_accuracy, val_accuracy=probes.val_accuracy,
      probe_coef=probes.coef, probe_intercept=probes.intercept,
      probe_converged=probes.converged, num_labelled=num_labelled, valid=valid)


def fit_pas(activations: jax.Array, known_answers, *, key: jax.Array,
            top_k: int | float = DEFAULT_TOP_K, c: float = 1.0, val_fraction: float = 0.4,
            split_by: str = "pairs", min_items: int = DEFAULT_MIN_ITEMS,
            subject_ids: jax.Array | None = None, max_iter: int = 200, tol: float = 1e-6,
            head_chunk: int = 1) -> PasFit:
  """Fits PAS for every subject at once.

  Args:
    activations: `float[items, 2, L, H, D]` head outputs at the answer token, `[:, 0]` for
      answer "A", `[:, 1]` for "E" (see `labels`). Shared by all subjects.
    known_answers: `int[S, items]` answers 1..5 to the same items, 0 = missing. May be
      sharded over its first axis; the outputs follow it.
    key: a PRNG key for the train/validation splits.
    top_k: heads to keep, an int or a fraction of all `L * H` heads.
    c: scikit-learn's `C` for the probes.
    val_fraction: share of each subject's labelled items (or vectors) held out.
    split_by: "pairs" (default) or "vectors"; see `labels.train_val_split`.
    min_items: fewest labelled items for a subject to be fitted (`valid`).
    subject_ids: `int[S]` ids that seed each subject's split (default `arange(S)`); pass
      the global ids when fitting a subset so each subject keeps its split.
    max_iter, tol, head_chunk: solver settings, see `probes.fit_probes`.

  Raises:
    UserInputError: bad shapes, non-finite activations, answers outside 0..5, bad top_k.
  """
  labels_lib.check_activations(activations)
  num_items, _, num_layers, num_heads, _ = activations.shape
  answers = labels_lib.check_known_answers(known_answers, num_items=num_items)
  k = probes_lib.resolve_top_k(top_k, num_layers * num_heads)
  if not 0.0 < val_fraction < 1.0:
    raise input_error("val_fraction", "value", f"{val_fraction!r} is outside (0, 1)")
  if min_items < 1:
    raise input_error("min_items", "value", f"{min_items!r} is below 1")
  if split_by not in labels_lib.SPLITS:
    raise input_error("split_by", "value", f"{split_by!r} is not one of {labels_lib.SPLITS}")
  if subject_ids is None:
    subject_ids = jnp.arange(answers.shape[0], dtype=jnp.int32)
  elif np.shape(subject_ids) != answers.shape[:1]:
    raise input_error("subject_ids", "shape",
                      f"{np.shape(subject_ids)} does not match {answers.shape[0]} subjects")
  else:
    subject_ids = jnp.asarray(subject_ids, jnp.int32)
  # The checked copy lives on the host; the caller's array keeps its sharding.
  if not isinstance(known_answers, jax.Array):
    known_answers = answers
  return _fit_pas(activations, known_answers, key, subject_ids, top_k=k, c=float(c),
                  val_fraction=float(val_fraction), split_by=split_by,
                  min_items=int(min_items), max_iter=int(max_iter), tol=float(tol),
                  head_chunk=int(head_chunk))


def steering_vectors(fit: PasFit, alphas) -> jax.Array:
  """`float32[S, A, L, H, D]`: `alpha * sigma * direction` on kept heads, zero elsewhere."""
  alphas = jnp.asarray(alphas, jnp.float32)
  unit = steering_for_alpha(fit, 1.0)
  return alphas[None, :, None, None, None] * unit[:, None]


def steering_for_alpha(fit: PasFit, alpha) -> jax.Array:
  """`float32[S, L, H, D]` for one alpha, a scalar or one per subject `[S]` (e.g. the
  chosen alpha of each subject)."""
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), fit.valid.shape)
  scale = jnp.where(fit.head_mask, fit.sigma, 0.0) * alpha[:, None, None]
  return scale[..., None] * fit.directions
