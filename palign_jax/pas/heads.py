"""Head selection: how many heads to keep, and which, with ties broken without index bias.

A head's score is the mean of its probe's training and validation accuracy. Accuracies are
fractions with small denominators (a subject labels a few dozen items), so many heads tie; the
reference breaks ties by numpy's `argsort` order and an early version of this project by the
lowest flat index, i.e. systematically towards early layers. Here ties are broken by a seeded
random order per subject (`subject_keys`), so every tied head is equally likely to be kept and
the same subject always keeps the same heads.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from palign_jax.errors import input_error


def resolve_top_k(count: int | None, fraction: float | None, num_heads_total: int, *,
                  source: str = "pas") -> int:
  """The number of heads to keep: a count, or a fraction of all heads when one is given.

  Args:
    count: keep this many heads (1..num_heads_total); used when `fraction` is None.
    fraction: keep round(fraction * num_heads_total) heads (at least 1), 0 < fraction <= 1;
      when given, it is used instead of `count`.
    num_heads_total: layers * heads of the model.
    source: the config prefix named in error messages.
  """
  if fraction is None:
    if count is None:
      raise input_error(f"{source}.top_k", "value", "no number of heads given (top_k and "
                        "top_k_fraction are both unset)")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
      raise input_error(f"{source}.top_k", "value", f"expected a whole number of heads, got "
                        f"{count!r} (use top_k_fraction for a share of all heads)")
    if not 1 <= count <= num_heads_total:
      raise input_error(f"{source}.top_k", "value",
                        f"{count} heads asked for, but the model has {num_heads_total}")
    return int(count)
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
      0.0 < fraction <= 1.0):
    raise input_error(f"{source}.top_k_fraction", "value",
                      f"{fraction!r} is not a fraction in (0, 1]")
  return max(1, int(round(fraction * num_heads_total)))


def select_top_heads(scores: jax.Array, k, keys: jax.Array) -> jax.Array:
  """`bool[subjects, layers, heads]`: each subject's `k` best-scoring heads.

  Args:
    scores: `float[subjects, layers, heads]`.
    k: heads kept per subject (may be traced, so changing it does not recompile).
    keys: one PRNG key per subject; heads with equal scores are ordered by a uniform draw
      from it, so ties are broken at random but reproducibly per subject.
  """
  flat = scores.reshape(scores.shape[0], -1)
  tiebreak = jax.vmap(lambda key: jax.random.uniform(key, flat.shape[1:]))(keys)
  # lexsort: the last key is the primary one (score, descending), then the random draw.
  order = jnp.lexsort((tiebreak, -flat), axis=-1)
  rank = jnp.argsort(order, axis=-1)
  return (rank < k).reshape(scores.shape)
