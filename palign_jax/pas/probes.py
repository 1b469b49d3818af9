"""Per-head logistic probes for every subject at once.

One L2-regularised logistic regression per (subject, layer, head), the objective of
scikit-learn's `LogisticRegression(C=C)`: `0.5 * ||w||^2 + C * sum(logloss)`, intercept
unpenalised. A head's score is the mean of its training and validation accuracy (the
reference's ranking); `heads` keeps the best ones.

Solver: L-BFGS (memory 10, as scikit-learn's lbfgs), preconditioned, with a Newton
line search, written for this layout rather than taken from optax. All subjects share
the same vectors and differ only in labels and masks, so for one head the costly part of
an iteration is two dense products with the shared `[N, D+1]` matrix for all subjects
at once: margins `[S, D+1] x [D+1, N]` and gradients `[S, N] x [N, D+1]`. Margins are
linear in the step size, so the line search (a 1-D Newton step on the convex step
objective) costs one elementwise pass over `[S, N]`; optax's zoom line search would
re-evaluate the loss and gradient instead. The preconditioner (`_preconditioner`) is
shared by all subjects of a head, so it costs two `[D+1, D+1]` products per iteration.

Why not Newton: it needs fewer iterations (about 10 against 20-25) but each forms `S`
Hessians per head (a product 33 times a gradient's at D = 64) and factors them one by
one; a batched Newton version of this module measured 4-6x slower end to end on the
2-core CPU (300 subjects x 270 heads).

Each probe stops updating once its own scaled gradient is below `tol`, so its result
does not depend on what it is batched with (up to float rounding). Heads go through
`lax.map`, which bounds memory to one head's `[S, N]` arrays at a time.

Features are centred on the mean of all vectors (per head) before fitting: the intercept
is unpenalised, so this is the same problem, better conditioned; the intercept is
shifted back afterwards.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_MEMORY = 10  # L-BFGS history, scikit-learn's (scipy's) default
_CURVATURE_GUESS = 0.075  # see _preconditioner


class ProbeFit(NamedTuple):
  """Fitted probes for every subject, layer and head."""

  coef: jax.Array  # float32[subjects, layers, heads, head_dim]
  intercept: jax.Array  # float32[subjects, layers, heads]
  train_accuracy: jax.Array  # float32[subjects, layers, heads]; 0 with no training vectors
  val_accuracy: jax.Array  # float32[subjects, layers, heads]; 0 with no validation vectors
  # bool[subjects, layers, heads]: scaled gradient <= tol, or no step lowers the objective
  # in float32 any more
  converged: jax.Array
  iterations: jax.Array  # int32[subjects, layers, heads]: L-BFGS steps taken

  @property
  def score(self) -> jax.Array:
    """The reference's head score: mean of validation and training accuracy."""
    return 0.5 * (self.train_accuracy + self.val_accuracy)


def _dot(a, b):
  return jnp.sum(a * b, axis=-1)


def _loss_terms(z, y, m, c):
  """From one sigmoid pass over margins `z [S, N]`: the loss `C * sum(m * logloss)` `[S]`,
  the residual `C * m * (sigmoid(z) - y)` and the curvature `C * m * p * (1 - p)`."""
  sign = 2.0 * y - 1.0
  u = sign * z
  fit = jax.nn.sigmoid(u)  # the probability given to the true class
  # -log(sigmoid(u)); below -20 it is -u to within 2e-9 and the sigmoid may underflow.
  logloss = jnp.where(u > -20.0, -jnp.log(jnp.maximum(fit, 1e-30)), -u)
  return (c * jnp.sum(m * logloss, axis=-1), c * m * sign * (fit - 1.0),
          c * m * fit * (1.0 - fit))


def _preconditioner(x, c):
  """`(P, P^-1)`, symmetric `[D, D]`, with `P = (I + beta * cov(x))^(-1/2)`.

  Solving for `v = P^-1 w` turns the Hessian `I + C X^T diag(p(1-p)) X` into roughly
  `P (I + C n p(1-p) cov) P`, close to the identity when the vectors' covariance is
  far from isotropic (as head outputs are). `beta = C * (N / 2) * 0.075`: about half
  the vectors train a typical subject, and 0.075 is a typical p(1-p) near the optimum
  (0.25 is its bound); it is fixed, not fitted, so a subject's path does not depend on
  the other subjects. On features with log-normal scales (sd 1) this cut L-BFGS
  iterations from 100-200 to about 25, and by a quarter on isotropic ones.
  """
  n, d = x.shape
  beta = c * (0.5 * n) * _CURVATURE_GUESS
  evals, evecs = jnp.linalg.eigh(jnp.eye(d, dtype=x.dtype) + beta * (x.T @ x) / n)
  scaled = lambda power: (evecs * evals ** power) @ evecs.T
  return scaled(-0.5), scaled(0.5)


def _pad(matrix, corner):
  """`[D, D]` -> `[D+1, D+1]` with `corner` at the intercept's place."""
  d = matrix.shape[0]
  out = jnp.zeros((d + 1, d + 1), matrix.dtype).at[:d, :d].set(matrix)
  return out.at[d, d].set(corner)


def _fit_head(x, y, m, *, c, max_iter, tol):
  """Preconditioned L-BFGS for one head, all subjects.

  Args:
    x: `[N, D]` the head's (centred) vectors, shared by all subjects.
    y: `[S, N]` labels in {0, 1}.
    m: `[S, N]` 1 for the subject's training vectors, else 0.

  Returns:
    `(w [S, D+1], converged [S], iterations [S])`, the intercept last.
  """
  n, d = x.shape
  s = y.shape[0]
  p, p_inv = _preconditioner(x, c)
  # The solver's variable is v = [P^-1 w, b]: margins are z = [x P, 1] . v and the
  # penalty is 0.5 v^T Q v with Q = [P P, 0] (the intercept stays unpenalised).
  xa = jnp.concatenate([x @ p, jnp.ones((n, 1), x.dtype)], axis=1)  # [N, D+1]
  q_mat = _pad(p @ p, 0.0)
  to_w = _pad(p, 1.0)  # v -> w; the gradient in w is (gradient in v) @ P^-1
  to_w_grad = _pad(p_inv, 1.0)
  # scikit-learn's lbfgs stopping rule: the gradient of the objective in w divided by
  # C * n_train (its mean loss plus penalty) is below `tol` everywhere.
  grad_scale = c * jnp.maximum(m.sum(axis=-1), 1.0)
  converged = lambda g: jnp.max(jnp.abs(g @ to_w_grad), axis=-1) <= tol * grad_scale

  def evaluate(v, qv, z):
    loss, residual, curvature = _loss_terms(z, y, m, c)
    return 0.5 * _dot(qv, v) + loss, residual @ xa + qv, curvature

  def step(state):
    it, v, qv, z, f, g, curvature, hist_s, hist_y, rho, gamma, shrink, steps, done = state
    done = done | converged(g)
    steps = steps + ~done
    # Two-loop recursion over the ring buffer, newest pair first; pairs with rho = 0
    # (rejected or cleared) drop out.
    slots = [(it - 1 - j) % _MEMORY for j in range(_MEMORY)]
    q, alphas = g, []
    for k in slots:
      a = rho[k] * _dot(hist_s[k], q)
      q = q - a[:, None] * hist_y[k]
      alphas.append(a)
    q = gamma[:, None] * q
    for k, a in zip(reversed(slots), reversed(alphas), strict=True):
      b = rho[k] * _dot(hist_y[k], q)
      q = q + (a - b)[:, None] * hist_s[k]
    direction = jnp.where((_dot(g, q) > 0)[:, None], -q, -g)
    dz = direction @ xa.T  # [S, N]
    q_dir = direction @ q_mat
    # Step size: one Newton step on phi(t) = objective(v + t direction) from t = 0, with
    # the curvature kept from the last evaluation, so it costs one elementwise pass over
    # [S, N]. phi is convex, so this is near the exact line-search minimum; the
    # acceptance test below catches the rare overshoot. (Refining it with more Newton
    # steps did not reduce the iteration count.)
    t = shrink * -_dot(g, direction) / jnp.maximum(
        _dot(q_dir, direction) + _dot(curvature, dz * dz), 1e-30)
    # Margins and the penalty's gradient are linear in t: no product with X needed.
    v_new = v + t[:, None] * direction
    qv_new = qv + t[:, None] * q_dir
    z_new = z + t[:, None] * dz
    f_new, g_new, curvature_new = evaluate(v_new, qv_new, z_new)
    # The slack absorbs float32 rounding of the sums near the optimum.
    accept = ~done & (f_new <= f + 1e-6 * jnp.abs(f)) & (t > 0)
    # A rejected step clears the history (the next direction is the steepest descent)
    # and shrinks the next step 4x; after ten rejections in a row no step lowers the
    # objective in float32 and the probe is done.
    shrink = jnp.where(accept, 1.0, 0.25 * shrink)
    done = done | (shrink < 1e-6)
    keep = lambda new, old: jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)),
                                      new, old)
    ds, dg = v_new - v, g_new - g
    sy, yy = _dot(ds, dg), _dot(dg, dg)
    good = accept & (sy > 1e-10 * yy)
    slot = it % _MEMORY
    rho = jnp.where(accept | done, rho, 0.0).at[slot].set(
        jnp.where(good, 1.0 / jnp.where(good, sy, 1.0), 0.0))
    hist_s = hist_s.at[slot].set(ds)
    hist_y = hist_y.at[slot].set(dg)
    gamma = jnp.where(good, sy / jnp.where(good, yy, 1.0), jnp.where(accept, gamma, 1.0))
    return (it + 1, keep(v_new, v), keep(qv_new, qv), keep(z_new, z), keep(f_new, f),
            keep(g_new, g), keep(curvature_new, curvature), hist_s, hist_y, rho, gamma,
            shrink, steps, done)

  v0 = jnp.zeros((s, d + 1), x.dtype)
  z0 = jnp.zeros((s, n), x.dtype)
  f0, g0, curvature0 = evaluate(v0, v0, z0)
  hist = jnp.zeros((_MEMORY, s, d + 1), x.dtype)
  ones = jnp.ones((s,), x.dtype)
  init = (0, v0, v0, z0, f0, g0, curvature0, hist, hist, jnp.zeros((_MEMORY, s), x.dtype),
          ones, ones, jnp.zeros((s,), jnp.int32), jnp.zeros((s,), bool))
  final = jax.lax.while_loop(
      lambda state: (state[0] < max_iter) & ~jnp.all(state[-1]), step, init)
  v, g, steps, done = final[1], final[5], final[-2], final[-1]
  return v @ to_w.T, done | converged(g), steps


def _accuracy(z, y, mask):
  """Share of `mask`ed vectors whose sign of `z` matches `y`; 0 where `mask` is empty."""
  hits = jnp.sum(mask * ((z > 0) == (y > 0.5)), axis=-1)
  return hits / jnp.maximum(mask.sum(axis=-1), 1.0)


@functools.partial(jax.jit, static_argnames=("head_chunk",))
def fit_probes(vectors: jax.Array, labels: jax.Array, train: jax.Array, val: jax.Array, *,
               c: float = 1.0, max_iter: int = 200, tol: float = 1e-6,
               head_chunk: int = 1) -> ProbeFit:
  """Fits one logistic probe per (subject, layer, head).

  Args:
    vectors: `float[N, layers, heads, D]` the shared vectors (N = 2 * items).
    labels: `int[subjects, N]` in {0, 1}.
    train: `bool[subjects, N]` each subject's training vectors.
    val: `bool[subjects, N]` each subject's validation vectors.
    c: inverse regularisation strength (scikit-learn's `C`).
    max_iter: cap on L-BFGS iterations (about 25 are typical).
    tol: stop once `max|grad| <= tol * C * n_train` (scikit-learn's lbfgs default is 1e-4).
    head_chunk: heads fitted together (vmapped) per `lax.map` step; 1 (a plain scan over
      heads) is fastest on CPU, larger chunks give an accelerator more parallel work.
      Memory grows with `head_chunk * subjects * N`.
  """
  x = vectors.astype(jnp.float32)
  n, num_layers, num_heads, d = x.shape
  heads = x.reshape(n, num_layers * num_heads, d).transpose(1, 0, 2)  # [LH, N, D]
  centre = heads.mean(axis=1, keepdims=True)
  heads = heads - centre
  y = labels.astype(jnp.float32)
  m_train = train.astype(jnp.float32)
  m_val = val.astype(jnp.float32)

  def one_head(xh):
    w, done, steps = _fit_head(xh, y, m_train, c=c, max_iter=max_iter, tol=tol)
    z = w[:, :-1] @ xh.T + w[:, -1:]
    return w, done, steps, _accuracy(z, y, m_train), _accuracy(z, y, m_val)

  # One head per step by default: on CPU, batching heads with vmap measured 2x slower
  # than a scan whose body is one plain matrix product per head.
  w, done, steps, acc_train, acc_val = jax.lax.map(
      one_head, heads, batch_size=None if head_chunk == 1 else head_chunk)
  # [LH, S, ...] -> [S, L, H, ...]
  to_subjects = lambda a: jnp.moveaxis(a, 0, 1).reshape(
      (a.shape[1], num_layers, num_heads) + a.shape[2:])
  coef = w[..., :-1]
  intercept = w[..., -1] - jnp.einsum("hsd,hd->hs", coef, centre[:, 0])
  return ProbeFit(coef=to_subjects(coef), intercept=to_subjects(intercept),
                  train_accuracy=to_subjects(acc_train), val_accuracy=to_subjects(acc_val),
                  converged=to_subjects(done), iterations=to_subjects(steps))
