"""DPO (Rafailov et al., 2023) with LoRA adapters, many independent training rows in one program.

Owns the training: completion log-probabilities, the DPO loss, an optax step vmapped over a
`rows` axis (one adapter per row, e.g. per subject and fold, all sharing the frozen base
weights), and the loop that records every row's loss per step, keeps adapter snapshots at
candidate step counts and stops a row whose loss or update is not finite.

Data layout (token ids only; what the tokens say is the caller's business):
  * `PreferenceData`: I prompts, each with O candidate completions, shared by every row. A
    prompt is encoded once per pair into a key/value cache; its completions continue from it,
    so chosen and rejected share the prompt's work (the part that is ~90% of the tokens).
  * `RowPairs`: each row's preference pairs `(prompt, chosen option, rejected option)`.

The loss of a row, over a minibatch of its pairs with weights w (0 = padding):

    z = beta * ((log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x)))
    loss = sum(w * -log sigmoid(z)) / max(sum(w), 1)

with log pi the summed log-probability of the whole completion under the adapted model and
ref the frozen base model (computed once, `reference_log_probs`). An untrained adapter (b = 0)
is the base model, so the first loss is log 2.

Minibatches come from a host-side schedule (epochs of a per-row seeded permutation), so a
row's training depends on its own seed only, not on which rows share its batch.

On a mesh (`train(..., mesh=)`) the rows are split over its `data` axis: each device holds,
updates and snapshots only its rows' adapters and optimizer state (`parallel.constrain_rows`
inside the compiled program), the frozen base is used as the caller sharded it, and rows are
padded (masked, never updated) to a multiple of the axis. Every shape of the compiled program
is fixed per run (token tables from all prompts, `RowPairs` width, row count), so successive
batches reuse one compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from palign_jax import parallel
from palign_jax.dpo import lora
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import forward
from palign_jax.models.params import Params

# Adam's direction; each row's learning rate multiplies it, so rows may search rates.
_OPTIMIZER = optax.scale_by_adam()
REFERENCE_CHUNK = 8  # prompts per reference call (x O completions): bounds the logits' memory


class PreferenceData(NamedTuple):
  """Prompts and their candidate completions, as padded token tables."""

  prompts: jax.Array  # int32[I, S]: each prompt without its last token, right-padded
  prompt_lengths: jax.Array  # int32[I]: real tokens in `prompts` (the prompt's length - 1)
  branches: jax.Array  # int32[I, O, T]: the prompt's last token, then the completion
  branch_lengths: jax.Array  # int32[I, O]: 1 + completion length

  @classmethod
  def build(cls, prompts: Sequence[Sequence[int]],
            completions: Sequence[Sequence[Sequence[int]]]) -> PreferenceData:
    """prompts: I token sequences (at least 2 tokens); completions: per prompt, O non-empty
    token sequences (the same O for every prompt)."""
    n_options = {len(c) for c in completions}
    if len(prompts) != len(completions) or len(n_options) != 1:
      raise ValueError("PreferenceData: one list of the same number of completions per prompt")
    if min(map(len, prompts)) < 2 or min(len(c) for cs in completions for c in cs) < 1:
      raise ValueError("PreferenceData: prompts need 2+ tokens and completions 1+")
    (n_options,) = n_options
    S = max(map(len, prompts)) - 1
    T = 1 + max(len(c) for cs in completions for c in cs)
    tokens = np.zeros((len(prompts), S), np.int32)
    branches = np.zeros((len(prompts), n_options, T), np.int32)
    branch_lengths = np.zeros((len(prompts), n_options), np.int32)
    for i, (prompt, options) in enumerate(zip(prompts, completions, strict=True)):
      tokens[i, :len(prompt) - 1] = prompt[:-1]
      for o, completion in enumerate(options):
        branch = [prompt[-1], *completion]
        branches[i, o, :len(branch)] = branch
        branch_lengths[i, o] = len(branch)
    return cls(jnp.asarray(tokens), jnp.asarray([len(p) - 1 for p in prompts], jnp.int32),
               jnp.asarray(branches), jnp.asarray(branch_lengths))


class RowPairs(NamedTuple):
  """Each row's preference pairs; row r's real pairs are its first `count[r]`."""

  prompt: np.ndarray  # int32[R, M]: index into PreferenceData's prompts
  chosen: np.ndarray  # int32[R, M]: option index of the preferred completion
  rejected: np.ndarray  # int32[R, M]: option index of the dispreferred completion
  count: np.ndarray  # int32[R]

  @classmethod
  def build(cls, rows: Sequence[Sequence[tuple[int, int, int]]],
            width: int | None = None) -> RowPairs:
    """rows: per row, `(prompt, chosen, rejected)` triples (a row may have none); width: the
    padded M, fixed per run so that every batch has one compiled shape (default: the most
    pairs of any row, which changes from batch to batch). Raises ValueError when a row has
    more pairs than `width`: growing it silently would recompile."""
    most = max(map(len, rows), default=0)
    if width is not None and most > width:
      raise ValueError(f"RowPairs: a row has {most} pairs, more than the fixed width {width}")
    width = max(1, most) if width is None else max(1, width)
    table = np.zeros((3, len(rows), width), np.int32)
    for r, triples in enumerate(rows):
      if len(triples):
        table[:, r, :len(triples)] = np.asarray(triples, np.int32).T
    return cls(table[0], table[1], table[2], np.array([len(t) for t in rows], np.int32))


class TrainSettings(NamedTuple):
  beta: float  # DPO temperature: how far the policy may move from the reference
  lora_scale: float  # alpha / rank (`lora.lora_scale`)
  max_steps: int  # optimizer steps per row
  eval_every: int  # a snapshot every this many steps (and at 0); divides max_steps
  pairs_per_step: int  # minibatch size per row

  @property
  def candidate_steps(self) -> np.ndarray:
    """`int[C]`: the step counts with a snapshot: 0, eval_every, ..., max_steps."""
    return np.arange(0, self.max_steps + 1, self.eval_every)


class TrainResult(NamedTuple):
  snapshots: lora.Adapters  # forward form (scale folded in), every leaf [R, C, layers, ...]
  steps: np.ndarray  # int[C]: step count of each snapshot (0 = untrained = the base model)
  loss: np.ndarray  # f32[R, max_steps]: the minibatch loss at each step; NaN once stopped
  stopped_at: np.ndarray  # int[R]: -1, or the step t whose loss or update was not finite
  #   (t updates were applied; the snapshots at steps >= t, other than 0, must not be used)
  stopped_by_group: np.ndarray  # bool[R]: stopped because another row of its group failed
  messages: tuple[str, ...]  # one per stopped row


class TrainState(NamedTuple):
  adapters: lora.Adapters  # trainable form, leaves [R, ...]
  opt_state: Any
  alive: jax.Array  # bool[R]
  stopped_at: jax.Array  # int32[R], -1 while alive
  by_group: jax.Array  # bool[R]: stopped because another row of its group failed


# --- log-probabilities and the loss ------------------------------------------------------------

def completion_log_probs(params: Params, config: ModelConfig, data: PreferenceData,
                         prompts: jax.Array, options: jax.Array,
                         adapters: lora.Adapters | None = None) -> jax.Array:
  """`f32[n, K]`: log-probability of each whole completion given its prompt.

  prompts int32[n] (indices into `data`), options int32[n, K] (K completions of each prompt,
  e.g. chosen and rejected); adapters: forward form, shared by all n (or None: the base).
  Each prompt is encoded once; its K completions attend to that cache. The sum runs over
  every completion token (not just the first), each predicted from the tokens before it.
  """
  n, K = options.shape
  tokens, lengths = data.prompts[prompts], data.prompt_lengths[prompts]
  S = tokens.shape[1]
  cache = forward(params, config, tokens, None,
                  attention_mask=jnp.arange(S)[None] < lengths[:, None], return_logits=False,
                  return_kv=True, adapters=adapters).kv_cache
  tile = lambda x: jnp.repeat(x, K, axis=1)  # [layers, n, ...] -> [layers, n * K, ...]
  cache = cache._replace(keys=tile(cache.keys), values=tile(cache.values),
                         mask=jnp.repeat(cache.mask, K, axis=0))
  branch = data.branches[prompts[:, None], options].reshape(n * K, -1)  # [n K, T]
  branch_lengths = data.branch_lengths[prompts[:, None], options].reshape(n * K)
  T = branch.shape[1]
  positions = jnp.repeat(lengths, K)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  logits = forward(params, config, branch, positions,
                   attention_mask=jnp.arange(T)[None] < branch_lengths[:, None], kv_cache=cache,
                   logits_positions=jnp.broadcast_to(jnp.arange(T - 1), (n * K, T - 1)),
                   adapters=adapters).logits  # position t predicts branch token t + 1
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token = jnp.take_along_axis(log_probs, branch[:, 1:, None], axis=-1)[..., 0]  # [n K, T-1]
  real = jnp.arange(1, T)[None] < branch_lengths[:, None]
  return jnp.sum(jnp.where(real, token, 0.0), axis=-1).reshape(n, K)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, beta: float | jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
  """The DPO loss, a weighted mean over pairs of `-log sigmoid(beta * margin)` (all `[n]`)."""
  margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
  losses = jax.nn.softplus(-beta * margin)  # = -log sigmoid(beta * margin), stable
  if weights is None:
    return jnp.mean(losses)
  return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(jax.jit, static_argnames=("config",))
def _reference_chunk(params, config, data, prompts):
  options = jnp.broadcast_to(jnp.arange(data.branches.shape[1]), (len(prompts),
                                                                   data.branches.shape[1]))
  return completion_log_probs(params, config, data, prompts, options)


def reference_log_probs(params: Params, config: ModelConfig, data: PreferenceData) -> np.ndarray:
  """`f32[I, O]`: every completion's log-probability under the frozen base model."""
  n = data.prompts.shape[0]
  out = []
  for start in range(0, n, REFERENCE_CHUNK):
    chunk = np.minimum(np.arange(start, start + REFERENCE_CHUNK), n - 1)  # pad: repeat last
    out.append(_reference_chunk(params, config, data, jnp.asarray(chunk, jnp.int32)))
  return np.asarray(jnp.concatenate(out))[:n]


def row_loss(trainable: lora.Adapters, params: Params, config: ModelConfig, data: PreferenceData,
             reference: jax.Array, prompts: jax.Array, chosen: jax.Array, rejected: jax.Array,
             weights: jax.Array, beta, scale) -> jax.Array:
  """One row's DPO loss on a minibatch (`[P]` each) for trainable-form adapters."""
  both = completion_log_probs(params, config, data, prompts, jnp.stack([chosen, rejected], -1),
                              lora.for_forward(trainable, scale))
  return dpo_loss(both[:, 0], both[:, 1], reference[prompts, chosen],
                  reference[prompts, rejected], beta, weights)


# --- the compiled steps --------------------------------------------------------------------------

def _per_row(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _train_chunk(params, config, data, reference, pairs, state: TrainState, indices, weights,
                 steps, learning_rates, groups, beta, scale, mesh=None):
  """`len(steps)` optimizer steps for every row at once (a scan over steps, vmap over rows).

  indices int32[n, R, P] into each row's pairs, weights f32[n, R, P], steps int32[n] (global
  step numbers), learning_rates f32[R], groups int32[R] (rows of a group stop together).
  mesh: None, or the mesh whose `data` axis splits the R rows (R a multiple of it): every
  per-row array, the scan's carry included, is constrained to that split, so a device holds
  and updates only its rows; only the [R] stop flags cross devices (a group may span them).
  -> (state, losses f32[n, R]).
  """
  R = learning_rates.shape[0]
  rows = functools.partial(parallel.constrain_rows, mesh)
  pairs, learning_rates, groups = rows((pairs, learning_rates, groups))
  indices, weights = parallel.constrain_rows(mesh, (indices, weights), axis=1)

  def one_row(adapters, opt_state, prompt, chosen, rejected, index, weight):
    loss, grads = jax.value_and_grad(row_loss)(
        adapters, params, config, data, reference, prompt[index], chosen[index],
        rejected[index], weight, beta, scale)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    return loss, updates, opt_state, finite

  def step(state, xs):
    index, weight, t = xs
    state = rows(state)
    loss, updates, opt_state, finite = jax.vmap(one_row)(
        state.adapters, state.opt_state, pairs.prompt, pairs.chosen, pairs.rejected, index,
        weight)
    adapters = jax.tree.map(lambda p, u: p - _per_row(learning_rates, u) * u, state.adapters,
                            updates)
    own_ok = jnp.isfinite(loss) & finite & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(p), axis=tuple(range(1, p.ndim)))
         for p in jax.tree.leaves(adapters)]), axis=0)
    group_ok = jax.ops.segment_min(own_ok.astype(jnp.int32), groups, num_segments=R)[groups] > 0
    ok = state.alive & own_ok & group_ok
    keep = lambda new, old: jnp.where(_per_row(ok, new), new, old)
    stopping = state.alive & ~ok
    state = TrainState(
        adapters=jax.tree.map(keep, adapters, state.adapters),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        alive=ok, stopped_at=jnp.where(stopping, t, state.stopped_at),
        by_group=state.by_group | (stopping & own_ok))
    return rows(state), rows(jnp.where(state.alive | stopping, loss, jnp.nan))

  state, losses = jax.lax.scan(step, rows(state), (indices, weights, steps))
  return state, parallel.constrain_rows(mesh, losses, axis=1)


# --- the loop ------------------------------------------------------------------------------------

def pair_schedule(counts: np.ndarray, steps: int, per_step: int, seeds: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Which pairs each row trains on at each step: `(indices int32[steps, R, per_step],
  weights f32[steps, R, per_step])`.

  A row with at least `per_step` pairs walks through epochs of a permutation seeded by its
  own seed; one with fewer uses all of them every step (the rest weight 0); none: all weight 0.
  """
  indices = np.zeros((steps, len(counts), per_step), np.int32)
  weights = np.zeros((steps, len(counts), per_step), np.float32)
  for r, (count, seed) in enumerate(zip(counts, seeds, strict=True)):
    count = int(count)
    if count == 0:
      continue
    if count < per_step:
      indices[:, r, :count] = np.arange(count)
      weights[:, r, :count] = 1.0
      continue
    rng = np.random.default_rng(int(seed))
    epochs = -(-steps * per_step // count)
    stream = np.concatenate([rng.permutation(count) for _ in range(epochs)])
    indices[:, r] = stream[:steps * per_step].reshape(steps, per_step)
    weights[:, r] = 1.0
  return indices, weights


def _pad_rows(tree, rows: int):
  """Every leaf's first axis zero-padded to `rows` (numpy leaves stay numpy)."""
  def pad(x):
    xp = np if isinstance(x, np.ndarray) else jnp
    if x.shape[0] == rows:
      return x
    return xp.concatenate([x, xp.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
  return jax.tree.map(pad, tree)


def train(params: Params, config: ModelConfig, data: PreferenceData, reference: np.ndarray,
          pairs: RowPairs, init: lora.Adapters, settings: TrainSettings, *,
          learning_rates: Sequence[float], seeds: Sequence[int],
          groups: Sequence[int] | None = None, row_names: Sequence[str] | None = None,
          mesh: jax.sharding.Mesh | None = None, rows: int | None = None) -> TrainResult:
  """Trains R adapters at once, one per row of `pairs`, from `init` (trainable form, leaves
  `[R, ...]`, e.g. `lora.init_adapters(..., lead=(R,))`).

  reference: `f32[I, O]` from `reference_log_probs`. learning_rates, seeds: per row.
  groups: `int[R]` in 0..R-1; a row whose loss or update is not finite stops with every row of
  its group (default: each row alone); the others go on, exactly as without it. row_names: for
  the messages. mesh: None (one device), or the mesh `params` live on: the rows are split over
  its `data` axis. rows: train as if there were this many rows (>= R; masked padding), so that
  batches with fewer real rows reuse the compiled program; the count is also rounded up to a
  multiple of the `data` axis. Every `eval_every` steps runs as one compiled program (a scan
  over steps, a vmap over rows). The result covers the R real rows only.
  """
  R = len(pairs.count)
  if settings.eval_every < 1 or settings.max_steps % settings.eval_every:
    raise ValueError(f"eval_every ({settings.eval_every}) must be >= 1 and divide max_steps "
                     f"({settings.max_steps})")
  if settings.pairs_per_step < 1:
    raise ValueError(f"pairs_per_step must be >= 1, got {settings.pairs_per_step}")
  groups = np.arange(R) if groups is None else np.asarray(groups)
  if groups.shape != (R,) or (groups < 0).any() or (groups >= R).any():
    raise ValueError(f"groups: expected {R} group ids in 0..{R - 1}, got {groups.tolist()}")
  if rows is not None and rows < R:
    raise ValueError(f"rows: {rows} is fewer than the {R} rows of pairs")
  row_names = [f"row {r}" for r in range(R)] if row_names is None else list(row_names)
  # Padding rows: no pairs (zero weights), rate 0, a group each, dead from the start.
  padded = parallel.padded_rows(max(R, rows or 0), mesh)
  extra = padded - R
  pairs = RowPairs(*_pad_rows(tuple(pairs), padded))
  groups = np.concatenate([groups, np.arange(R, padded)])
  rates = np.concatenate([np.asarray(learning_rates, np.float32), np.zeros(extra, np.float32)])
  indices, weights = pair_schedule(pairs.count, settings.max_steps, settings.pairs_per_step,
                                   list(seeds) + [0] * extra)
  adapters = _pad_rows(init, padded)
  put_rows = functools.partial(parallel.put_rows, mesh)
  state = put_rows(TrainState(adapters, jax.vmap(_OPTIMIZER.init)(adapters),
                              jnp.arange(padded) < R, jnp.full(padded, -1, jnp.int32),
                              jnp.zeros(padded, bool)))
  device_pairs, lrs, groups_dev = put_rows((pairs, jnp.asarray(rates),
                                            jnp.asarray(groups, jnp.int32)))
  data, reference = jax.tree.map(
      functools.partial(parallel.replicate, mesh),
      (data, jnp.asarray(reference, jnp.float32)))
  snapshot = lambda s: lora.for_forward(s.adapters, settings.lora_scale)
  snapshots, losses = [snapshot(state)], []
  for start in range(0, settings.max_steps, settings.eval_every):
    chunk = slice(start, start + settings.eval_every)
    state, loss = _train_chunk(
        params, config, data, reference, device_pairs, state,
        *parallel.put_rows(mesh, (jnp.asarray(indices[chunk]), jnp.asarray(weights[chunk])),
                           axis=1),
        jnp.arange(start, chunk.stop, dtype=jnp.int32), lrs, groups_dev,
        jnp.float32(settings.beta), jnp.float32(settings.lora_scale), mesh=mesh)
    snapshots.append(snapshot(state))
    losses.append(loss)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *snapshots)
  if extra:  # padding off (without padding the snapshots keep their split over rows)
    stacked = jax.tree.map(lambda x: x[:R], stacked)
  loss = (np.asarray(jnp.concatenate(losses, axis=0)).T if losses
          else np.zeros((padded, 0)))[:R]
  stopped_at, by_group = np.asarray(state.stopped_at)[:R], np.asarray(state.by_group)[:R]
  messages = []
  for r in np.flatnonzero(stopped_at >= 0):
    t = int(stopped_at[r])
    cause = ("another row of its group had a non-finite loss or update" if by_group[r] else
             "its DPO loss or update was not finite")
    messages.append(f"{row_names[r]}: training stopped at step {t + 1} of {settings.max_steps} "
                    f"because {cause}; adapters after {t} steps kept, snapshots from step {t} "
                    "on (other than step 0, the base model) are not to be used; the other rows "
                    "went on")
  return TrainResult(stacked, settings.candidate_steps, loss, stopped_at, by_group,
                     tuple(messages))
