"""The PAS fit: probes, kept heads, directions and sigma per subject, and steering tensors.

For each subject: label the shared vectors (`labels`), fit a probe per head (`probes`) and
keep the top K heads (`heads`), then for every head take the mass-mean direction (mean of the
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
from jax.sharding import Mesh

from palign_jax import parallel
from palign_jax.errors import input_error
from palign_jax.pas import heads as heads_lib
from palign_jax.pas import labels as labels_lib
from palign_jax.pas import probes as probes_lib


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


class FitSettings(NamedTuple):
  """How PAS fits a subject (the run's config, `config.pas` and `config.probe`, fills it)."""

  top_k: int  # heads kept per subject (see `heads.resolve_top_k`)
  c: float  # scikit-learn's C of the probes
  val_fraction: float  # share of a subject's labelled items (or vectors) held out
  split_by: str  # "pairs" (an item's A/E vectors stay together) or "vectors" (the reference)
  min_items: int  # fewest labelled items for a subject to be fitted at all
  max_iter: int  # L-BFGS iteration cap
  tol: float  # probe stopping tolerance (see `probes.fit_probes`)


# Only what changes shapes or code is static; numbers stay traced so that changing them
# does not recompile.
@functools.partial(jax.jit, static_argnames=("split_by", "head_chunk", "mesh"))
def _fit_pas(activations, known_answers, key, subject_ids, *, top_k, c, val_fraction,
             split_by, min_items, max_iter, tol, head_chunk, mesh) -> PasFit:
  known_answers, subject_ids = parallel.constrain_rows(mesh, (known_answers, subject_ids))
  x = labels_lib.flatten_activations(activations).astype(jnp.float32)
  lab = labels_lib.pair_labels(known_answers.astype(jnp.int32))
  split_key, tie_key = jax.random.split(key)
  train, val = labels_lib.train_val_split(labels_lib.subject_keys(split_key, subject_ids),
                                          lab.labelled, val_fraction=val_fraction,
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
  keep = heads_lib.select_top_heads(probes.score, top_k,
                                    labels_lib.subject_keys(tie_key, subject_ids))
  labelled = lab.labelled & valid[:, None]
  directions = mass_mean_directions(x, lab.labels, labelled)
  return parallel.constrain_rows(mesh, PasFit(
      head_mask=keep & valid[:, None, None], directions=directions,
      sigma=projection_std(x, directions, labelled),
      train_accuracy=probes.train_accuracy, val_accuracy=probes.val_accuracy,
      probe_coef=probes.coef, probe_intercept=probes.intercept,
      probe_converged=probes.converged, num_labelled=num_labelled, valid=valid))


def fit_pas(activations: jax.Array, known_answers, settings: FitSettings, *, key: jax.Array,
            subject_ids: jax.Array | None = None, head_chunk: int = 1,
            mesh: Mesh | None = None) -> PasFit:
  """Fits PAS for every subject at once.

  Args:
    activations: `float[items, 2, L, H, D]` head outputs at the answer token, `[:, 0]` for
      answer "A", `[:, 1]` for "E" (see `labels`). Shared by all subjects.
    known_answers: `int[S, items]` answers 1..5 to the same items, 0 = missing. May be
      sharded over its first axis; the outputs follow it.
    settings: see `FitSettings`.
    key: a PRNG key for the train/validation splits and the tie-breaking of head scores.
    subject_ids: `int[S]` ids that seed each subject's split and tie-breaking (default
      `arange(S)`); pass stable ids so a subject's fit does not depend on its batch.
    head_chunk: heads fitted together per step (see `probes.fit_probes`); no effect on results.
    mesh: None, or a `parallel` mesh: the compiled fit keeps the subjects (inputs and every
      output) split over its `data` axis.

  Raises:
    UserInputError: bad shapes, non-finite activations, answers outside 0..5, bad settings.
  """
  labels_lib.check_activations(activations)
  num_items, _, num_layers, num_heads, _ = activations.shape
  answers = labels_lib.check_known_answers(parallel.to_host(known_answers), num_items=num_items)
  k = heads_lib.resolve_top_k(settings.top_k, None, num_layers * num_heads)
  if not 0.0 < settings.val_fraction < 1.0:
    raise input_error("probe.val_fraction", "value",
                      f"{settings.val_fraction!r} is outside (0, 1)")
  if settings.min_items < 1:
    raise input_error("probe.min_items", "value", f"{settings.min_items!r} is below 1")
  if settings.split_by not in labels_lib.SPLITS:
    raise input_error("probe.split_by", "value",
                      f"{settings.split_by!r} is not one of {labels_lib.SPLITS}")
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
  return _fit_pas(activations, known_answers, key, subject_ids, top_k=k, c=float(settings.c),
                  val_fraction=float(settings.val_fraction), split_by=settings.split_by,
                  min_items=int(settings.min_items), max_iter=int(settings.max_iter),
                  tol=float(settings.tol), head_chunk=int(head_chunk), mesh=mesh)


def steering_vectors(fit: PasFit, alphas) -> jax.Array:
  """`float32[S, A, L, H, D]`: `alpha * sigma * direction` on kept heads, zero elsewhere.

  Made on the device and meant to stay there: the scorer gathers its (subject, alpha) rows
  inside its compiled call.
  """
  alphas = jnp.asarray(alphas, jnp.float32)
  unit = steering_for_alpha(fit, 1.0)
  return alphas[None, :, None, None, None] * unit[:, None]


def steering_for_alpha(fit: PasFit, alpha) -> jax.Array:
  """`float32[S, L, H, D]` for one alpha, a scalar or one per subject `[S]` (e.g. the
  chosen alpha of each subject)."""
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), fit.valid.shape)
  scale = jnp.where(fit.head_mask, fit.sigma, 0.0) * alpha[:, None, None]
  return scale[..., None] * fit.directions


@jax.jit
def item_scores(fit: PasFit, activations: jax.Array) -> jax.Array:
  """`float32[S, items]`: each subject's probes read on items' head outputs.

  activations: `float[items, 2, L, H, D]`, `[:, 0]` with answer "A", `[:, 1]` with "E" (as
  `fit_pas` takes them). Per kept head, the probe's probability that the "A" version is the
  subject's (label 1) minus that for the "E" version, in [-1, 1]; averaged over the subject's
  kept heads (0 for a subject without any). Higher: the subject agrees with the item.
  """
  x = activations.astype(jnp.float32)
  logits = jnp.einsum("nvlhd,slhd->snvlh", x, fit.probe_coef) + fit.probe_intercept[:, None,
                                                                                    None]
  prob = jax.nn.sigmoid(logits)
  agree = prob[:, :, 0] - prob[:, :, 1]  # [S, items, L, H]
  keep = fit.head_mask[:, None].astype(jnp.float32)
  return (agree * keep).sum((-1, -2)) / jnp.maximum(keep.sum((-1, -2)), 1.0)
