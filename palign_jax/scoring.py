"""Batched inference on token ids: context-shared answer scoring, head capture, generation.

Owns the hot path of PAS. A subject's context (a chat-formatted system prompt with their ~120
answers, ~1,400 tokens) is followed by short question turns, each ending where the answer
letter is generated. `score_contexts` encodes a batch of (context, steering) pairs at once into
one key/value cache and scores every question against each of them, reading the
log-probabilities of the option-letter tokens under the full vocabulary. Steering applies to
the context too, so every (subject, alpha) pair gets its own cache; the steering tensor
`[contexts, alphas, layers, heads, head_dim]` stays on the device and the batch's rows are
gathered there. Per-context LoRA adapters (a DPO-trained model per subject, `[contexts, ...]`
on every leaf) are gathered the same way and apply to the context and the questions alike.

Shapes are bucketed (`bucket_length`; pairs are sorted by context length and questions by
length so that each batch pads little) and batches padded to fixed sizes, so a run compiles a
handful of programs; padding never changes a result (padded keys are masked, padded rows are
dropped). Token ids only: prompt text and tokenization live elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from palign_jax import parallel
from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import KVCache, check_adapters, forward
from palign_jax.models.params import Params

PREFILL_SPLIT_MIN = 512  # prefixes at least this long are encoded in two halves


def bucket_length(n: int, minimum: int = 8) -> int:
  """Rounds `n` up to a multiple of max(`minimum`, 1/8 of the power of two below it).

  At most 12.5% padding (or `minimum` - 1 tokens) and 8 sizes per octave:
  45 -> 48, 50 -> 56, 1500 -> 1536, 1545 -> 1664.
  """
  n = int(n)
  if n <= minimum:
    return minimum
  step = max(minimum, 1 << max(0, (n - 1).bit_length() - 4))
  return -(-n // step) * step


def _check_sequences(seqs: Sequence, config: ModelConfig, what: str) -> list[np.ndarray]:
  out = []
  for i, s in enumerate(seqs):
    a = np.asarray(s)
    if a.ndim != 1 or a.size == 0:
      raise UserInputError(f"{what}[{i}]: expected a non-empty 1-D token id sequence, "
                           f"got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
      raise UserInputError(f"{what}[{i}]: token ids must be integers, got dtype {a.dtype}")
    bad = (a < 0) | (a >= config.vocab_size)
    if bad.any():
      raise UserInputError(f"{what}[{i}]: token id {int(a[bad][0])} is outside the vocabulary "
                           f"[0, {config.vocab_size})")
    out.append(a.astype(np.int32))
  if not out:
    raise UserInputError(f"{what}: no sequences given")
  return out


def _pad(seqs: Sequence[np.ndarray], length: int, rows: int | None = None,
         left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """-> tokens int32[rows, length] (padded with id 0), lengths int32[rows] (pad rows: 1)."""
  rows = len(seqs) if rows is None else rows
  tokens = np.zeros((rows, length), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i, s in enumerate(seqs):
    if left:
      tokens[i, length - len(s):] = s
    else:
      tokens[i, :len(s)] = s
    lengths[i] = len(s)
  return tokens, lengths


def _option_ids(option_ids, config: ModelConfig) -> jax.Array:
  ids = np.asarray(option_ids)
  if ids.ndim != 1 or ids.size == 0 or (ids < 0).any() or (ids >= config.vocab_size).any():
    raise UserInputError(f"option_ids: expected token ids in [0, {config.vocab_size}), "
                         f"got {ids.tolist()}")
  return jnp.asarray(ids, jnp.int32)


def _check_steering(steering, config: ModelConfig, leads: Sequence[tuple[int, ...]],
                    what: str) -> None:
  """Raises unless steering's shape is one of `lead + [layers, heads, head_dim]`."""
  per_head = (config.num_layers, config.num_heads, config.head_dim)
  shape = tuple(np.shape(steering))

  def fits(lead):
    return len(shape) == len(lead) + 3 and all(
        want in (None, got) for want, got in zip(lead, shape, strict=False))

  if shape[-3:] == per_head and any(map(fits, leads)):
    return
  expected = " or ".join(str(tuple("*" if d is None else d for d in lead) + per_head)
                         for lead in leads)
  raise UserInputError(f"{what}: steering has shape {shape}; expected {expected} "
                       "([..., layers, heads, head_dim])")


def _check_context_adapters(adapters, config: ModelConfig, contexts: int | None,
                            what: str) -> None:
  """Raises unless every adapter leaf is `[contexts, layers, ...]` for this model (`[layers,
  ...]`, one adapter for everything, when contexts is None)."""
  try:
    lead = check_adapters(adapters, config)
  except ValueError as err:
    raise UserInputError(f"{what}: {err}") from None
  if lead != contexts:
    raise UserInputError(f"{what}: adapters need a leading axis of {contexts} (one per "
                         f"context), got {lead}" if contexts is not None else
                         f"{what}: one adapter shared by every prompt, without a leading axis "
                         f"(got one of {lead})")


# --- jitted kernels ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def encode_prefixes(params: Params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                    steering: jax.Array | None = None, adapters: dict | None = None,
                    mesh: Mesh | None = None) -> KVCache:
  """Encodes right-padded prefixes into a cache.

  tokens int32[P, S], lengths int32[P], steering [P, layers, heads, head_dim] or None,
  adapters None or LoRA factors with a leading [P] axis (`llama.forward`)
  -> KVCache keys/values [layers, P, S, kv_heads, head_dim], mask bool[P, S].
  mesh: None, or the mesh whose `data` axis the P rows (inputs, cache) are split over.

  A long prefix is encoded in two halves, the second attending to the first's cache: causal
  attention over the whole prefix at once computes (and masks) the upper triangle of its score
  matrix, the halves skip a quarter of it (measured 22% faster at 1,408 tokens on a CPU; more
  halving measured no better).
  """
  tokens, lengths, steering, adapters = parallel.constrain_rows(
      mesh, (tokens, lengths, steering, adapters))
  rows = lambda cache: KVCache(*parallel.constrain_rows(mesh, (cache.keys, cache.values), 1),
                               parallel.constrain_rows(mesh, cache.mask))
  P, S = tokens.shape
  mask = jnp.arange(S)[None] < lengths[:, None]
  if S < PREFILL_SPLIT_MIN or S % 2:
    return rows(forward(params, config, tokens, None, attention_mask=mask, steering=steering,
                        return_logits=False, return_kv=True, adapters=adapters).kv_cache)
  half = S // 2
  positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (P, S))
  first = forward(params, config, tokens[:, :half], positions[:, :half],
                  attention_mask=mask[:, :half], steering=steering, return_logits=False,
                  return_kv=True, adapters=adapters).kv_cache
  second = forward(params, config, tokens[:, half:], positions[:, half:],
                   attention_mask=mask[:, half:], kv_cache=first, steering=steering,
                   return_logits=False, return_kv=True, adapters=adapters).kv_cache
  join = lambda a, b: jnp.concatenate([a, b], axis=2)
  return rows(KVCache(join(first.keys, second.keys), join(first.values, second.values), mask))


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def score_on_prefixes(params: Params, config: ModelConfig, cache: KVCache,
                      prefix_lengths: jax.Array, tokens: jax.Array, lengths: jax.Array,
                      option_ids: jax.Array, steering: jax.Array | None = None,
                      adapters: dict | None = None, mesh: Mesh | None = None) -> jax.Array:
  """Scores right-padded continuations of each cached prefix at their last real token.

  cache: from `encode_prefixes` ([layers, P, S, ...]); prefix_lengths int32[P];
  tokens int32[Q, T] and lengths int32[Q], shared by every prefix; option_ids int32[O];
  steering [P, layers, heads, head_dim] or None; adapters None or with a leading [P] axis (the
  same as the cache was encoded with); mesh: as in `encode_prefixes`
  -> f32[P, Q, O]: log-probabilities of the option ids under the full next-token
  distribution (their total is the probability the model gives to any option).
  """
  cache = KVCache(*parallel.constrain_rows(mesh, (cache.keys, cache.values), 1),
                  parallel.constrain_rows(mesh, cache.mask))
  prefix_lengths, steering, adapters = parallel.constrain_rows(
      mesh, (prefix_lengths, steering, adapters))

  def one(keys, values, mask, prefix_length, tokens, lengths, steering, adapters):
    Q, T = tokens.shape
    positions = jnp.broadcast_to(prefix_length + jnp.arange(T, dtype=jnp.int32), (Q, T))
    out = forward(params, config, tokens, positions,
                  attention_mask=jnp.arange(T)[None] < lengths[:, None],
                  kv_cache=KVCache(keys[:, None], values[:, None], mask[None]),
                  steering=steering, logits_positions=(lengths - 1)[:, None], adapters=adapters)
    return jnp.take(jax.nn.log_softmax(out.logits[:, 0], axis=-1), option_ids, axis=-1)

  per_prefix = lambda x: None if x is None else 0
  scores = jax.vmap(one, in_axes=(1, 1, 0, 0, None, None, per_prefix(steering),
                                  per_prefix(adapters)))(
      cache.keys, cache.values, cache.mask, prefix_lengths, tokens, lengths, steering, adapters)
  return parallel.constrain_rows(mesh, scores)


@functools.partial(jax.jit, static_argnames=("config",))
def score_sequences(params: Params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                    option_ids: jax.Array, steering: jax.Array | None = None) -> jax.Array:
  """Full forward of right-padded prompts int32[B, T] -> f32[B, O] option log-probabilities
  under the full next-token distribution.

  steering: [layers, heads, head_dim], [B, layers, heads, head_dim] or None.
  """
  out = forward(params, config, tokens, None,
                attention_mask=jnp.arange(tokens.shape[1])[None] < lengths[:, None],
                steering=steering, logits_positions=(lengths - 1)[:, None])
  return jnp.take(jax.nn.log_softmax(out.logits[:, 0], axis=-1), option_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def capture_last_token(params: Params, config: ModelConfig, tokens: jax.Array,
                       lengths: jax.Array, steering: jax.Array | None = None,
                       mesh: Mesh | None = None) -> jax.Array:
  """Head outputs of right-padded sequences at their last real token -> [B, layers, heads, hd]
  (rows split over `mesh`'s `data` axis, as in `encode_prefixes`)."""
  tokens, lengths = parallel.constrain_rows(mesh, (tokens, lengths))
  return parallel.constrain_rows(mesh, forward(
      params, config, tokens, None,
      attention_mask=jnp.arange(tokens.shape[1])[None] < lengths[:, None],
      steering=steering, capture_positions=lengths - 1, return_logits=False).head_outputs)


@functools.partial(jax.jit, static_argnames=("mesh",))
def gather_rows(table, index, mesh: Mesh | None = None):
  """`x[index]` for every leaf of `table` (index: int[P], or a tuple of them for several
  leading axes), computed on the devices and left split over `mesh`'s `data` axis: how the
  scorer takes each batch's steering and adapter rows without a copy through the host."""
  return parallel.constrain_rows(mesh, jax.tree.map(lambda x: x[index], table))


# --- drivers ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuestionBatches:
  """Questions sorted by length and cut into fixed-size, length-bucketed batches.

  Built once per question set and reused for every batch of contexts.
  """

  tokens: tuple[jax.Array, ...]  # each int32[question_batch, bucket]
  lengths: tuple[jax.Array, ...]  # each int32[question_batch] (padding rows: 1)
  order: np.ndarray  # int[Q]: question index of each row, batches concatenated

  @classmethod
  def build(cls, questions: Sequence[np.ndarray], question_batch: int) -> QuestionBatches:
    order = np.argsort([len(q) for q in questions], kind="stable")
    tokens, lengths = [], []
    for start in range(0, len(order), question_batch):
      chunk = [questions[i] for i in order[start:start + question_batch]]
      t, n = _pad(chunk, bucket_length(max(map(len, chunk))), question_batch)
      tokens.append(jnp.asarray(t))
      lengths.append(jnp.asarray(n))
    return cls(tuple(tokens), tuple(lengths), order)


def _batch_rows(count: int, prefix_batch: int) -> list[int]:
  """Rows of each prefix batch: full batches, then the remainder as distinct powers of two
  (7 -> 4, 2, 1): nothing is padded, and at most log2(prefix_batch) more program shapes."""
  sizes = [prefix_batch] * (count // prefix_batch)
  rest = count % prefix_batch
  while rest:
    sizes.append(1 << (rest.bit_length() - 1))
    rest -= sizes[-1]
  return sizes


def plan_prefix_batches(context_lengths: Sequence[int], prefix_batch: int
                        ) -> list[tuple[np.ndarray, int]]:
  """How `score_contexts` batches N (context, alpha) pairs: `(pair indices, padded length)` per
  batch. Pairs are sorted by context length, so each batch pads to a close bucket."""
  by_length = np.argsort(context_lengths, kind="stable")
  plan, start = [], 0
  for rows in _batch_rows(len(by_length), prefix_batch):
    chosen = by_length[start:start + rows]
    start += rows
    plan.append((chosen, bucket_length(max(context_lengths[i] for i in chosen))))
  return plan


def program_shapes(context_lengths: Sequence[int], question_lengths: Sequence[int],
                   prefix_batch: int, question_batch: int) -> set[tuple]:
  """The distinct compiled programs one `score_contexts` call needs: ("encode", rows, length)
  and ("score", rows, length, question_batch, question length) tuples."""
  q_buckets = {bucket_length(max(chunk)) for chunk in _chunks(sorted(question_lengths),
                                                                  question_batch)}
  shapes = set()
  for chosen, bucket in plan_prefix_batches(context_lengths, prefix_batch):
    shapes.add(("encode", len(chosen), bucket))
    shapes |= {("score", len(chosen), bucket, question_batch, t) for t in q_buckets}
  return shapes


def _chunks(items: Sequence, size: int) -> list:
  return [items[i:i + size] for i in range(0, len(items), size)]


def score_contexts(params: Params, config: ModelConfig, contexts: Sequence,
                   questions: Sequence | QuestionBatches, option_ids, *,
                   steering: jax.Array | None = None, pairs=None, question_batch: int,
                   prefix_batch: int, adapters: dict | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Option log-probabilities of every question after every (context, steering) pair.

  Args:
    contexts: C token-id sequences, e.g. one per subject (ragged lengths are fine), each
      tokenised once whatever the number of alphas.
    questions: Q token-id sequences shared by all contexts, each ending where the answer
      token is generated (the prompt is context + question), or prebuilt `QuestionBatches`.
    option_ids: O token ids (e.g. the letters A..E).
    steering: None, or `[C, A, layers, heads, head_dim]` on the device (A alphas; row
      `[c, a]` steers context c at alpha a); never copied to the host.
    pairs: `int[N, 2]` (context index, alpha index) rows to score; default every
      (c, a) in that order (every c, with alpha index 0, when steering is None).
    question_batch: questions per compiled call.
    prefix_batch: (context, alpha) pairs encoded and scored together per compiled call.
    adapters: None, or LoRA factors (`llama.forward`) with a leading `[C]` axis on every leaf:
      context c's model (e.g. a subject's DPO adapter), used for its context and questions
      at every alpha; gathered per pair on the device like steering.
    mesh: None, or the `parallel` mesh the params live on: each batch's pairs (tokens, steering,
      adapters, hence caches) are split over its `data` axis (a batch the axis does not divide,
      e.g. a remainder, is replicated), and XLA partitions the kernels from there.
  Returns:
    `f32[N, Q, O]`: log-probabilities of the options under the full next-token distribution.
  """
  contexts = _check_sequences(contexts, config, "contexts")
  if not isinstance(questions, QuestionBatches):
    questions = QuestionBatches.build(_check_sequences(questions, config, "questions"),
                                      question_batch)
  option_ids = _option_ids(option_ids, config)
  n_alphas = 1
  if steering is not None:
    _check_steering(steering, config, [(len(contexts), None)], "score_contexts")
    n_alphas = steering.shape[1]
  if adapters is not None:
    _check_context_adapters(adapters, config, len(contexts), "score_contexts")
    adapters = jax.tree.map(jnp.asarray, adapters)  # to the device once, gathered there
  if pairs is None:
    pairs = np.stack(np.meshgrid(np.arange(len(contexts)), np.arange(n_alphas),
                                 indexing="ij"), -1).reshape(-1, 2)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  if len(pairs) == 0:
    return np.zeros((0, len(questions.order), len(option_ids)), np.float32)
  if ((pairs[:, 0] < 0) | (pairs[:, 0] >= len(contexts)) | (pairs[:, 1] < 0)
      | (pairs[:, 1] >= n_alphas)).any():
    raise UserInputError(f"score_contexts: pairs must index {len(contexts)} contexts and "
                         f"{n_alphas} alphas")
  if prefix_batch < 1 or question_batch < 1:
    raise UserInputError(f"score_contexts: prefix_batch ({prefix_batch}) and question_batch "
                         f"({question_batch}) must be >= 1")

  scores = []
  for chosen, bucket in plan_prefix_batches([len(contexts[c]) for c, _ in pairs], prefix_batch):
    group = pairs[chosen]
    tokens, lengths = _pad([contexts[c] for c in group[:, 0]], bucket)
    tokens, lengths = parallel.put_batch(mesh, tokens), parallel.put_batch(mesh, lengths)
    rows_steering = rows_adapters = None
    if steering is not None:
      rows_steering = gather_rows(steering, (jnp.asarray(group[:, 0]), jnp.asarray(group[:, 1])),
                                  mesh=mesh)
    if adapters is not None:
      rows_adapters = gather_rows(adapters, jnp.asarray(group[:, 0]), mesh=mesh)
    cache = encode_prefixes(params, config, tokens, lengths, rows_steering, rows_adapters,
                            mesh=mesh)
    batches = [score_on_prefixes(params, config, cache, lengths, q_tokens, q_lengths,
                                 option_ids, rows_steering, rows_adapters, mesh=mesh)
               for q_tokens, q_lengths in zip(questions.tokens, questions.lengths, strict=True)]
    scores.append((chosen, jnp.concatenate(batches, axis=1)))
  out = np.empty((len(pairs), len(questions.order), len(option_ids)), np.float32)
  for chosen, batch_scores in scores:  # one transfer per batch, after everything is queued
    batch_scores = parallel.to_host(batch_scores)[:len(chosen)]
    out[chosen[:, None], questions.order[None, :]] = batch_scores[:, :len(questions.order)]
  return out


def compiled_programs() -> dict[str, int]:
  """How many programs each scoring kernel has compiled in this process (shapes seen)."""
  kernels = {"encode_prefixes": encode_prefixes, "score_on_prefixes": score_on_prefixes,
             "score_sequences": score_sequences, "capture_last_token": capture_last_token}
  return {name: kernel._cache_size() for name, kernel in kernels.items()}


def auto_prefix_batch(config: ModelConfig, context_length: int, question_batch: int,
                      question_length: int, budget_bytes: float, dtype_bytes: int = 4,
                      cap: int = 64) -> int:
  """The most (context, alpha) pairs per call (a power of two, 1..cap) whose working set fits
  in `budget_bytes`: each pair's key/value cache, plus the largest per-layer temporaries
  (attention scores in float32 while encoding the context and while scoring a question batch,
  and the MLP activations of a question batch), which exist for one layer at a time.
  """
  c = config
  cache = 2 * c.num_layers * context_length * c.num_kv_heads * c.head_dim * dtype_bytes
  query_rows = question_batch * question_length
  scores = 4 * c.num_heads * max(context_length * context_length,
                                 query_rows * (context_length + question_length))
  mlp = query_rows * (2 * c.intermediate_size + 4 * c.hidden_size) * max(dtype_bytes, 4)
  per_pair = cache + scores + mlp
  batch = 1
  while batch * 2 <= cap and batch * 2 * per_pair <= budget_bytes:
    batch *= 2
  return batch


def score_full_prompts(params: Params, config: ModelConfig, prompts: Sequence, option_ids, *,
                       steering=None, batch_size: int = 8) -> np.ndarray:
  """The baseline: one full forward per prompt (no prefix sharing) -> f32[N, O].

  steering: None or [layers, heads, head_dim] (the same for every prompt).
  """
  prompts = _check_sequences(prompts, config, "prompts")
  option_ids = _option_ids(option_ids, config)
  if steering is not None:
    _check_steering(steering, config, [()], "score_full_prompts")
    steering = jnp.asarray(steering)
  length = bucket_length(max(map(len, prompts)))
  scores = []
  for start in range(0, len(prompts), batch_size):
    tokens, lengths = _pad(prompts[start:start + batch_size], length, batch_size)
    scores.append(score_sequences(params, config, jnp.asarray(tokens), jnp.asarray(lengths),
                                  option_ids, steering))
  return np.asarray(jnp.concatenate(scores))[:len(prompts)]


def capture_head_outputs(params: Params, config: ModelConfig, sequences: Sequence, *,
                         steering=None, batch_size: int = 16,
                         mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Per-head attention outputs (o_proj inputs) at each sequence's last token.

  sequences: N token-id sequences; steering: None or [layers, heads, head_dim]; mesh: as in
  `score_contexts` (each batch's rows split over `data`).
  -> [N, layers, heads, head_dim] in the parameters' dtype. Sequences are batched by length
  (sorted, each batch padded to a bucket) and returned in input order.
  """
  sequences = _check_sequences(sequences, config, "sequences")
  if steering is not None:
    _check_steering(steering, config, [()], "capture_head_outputs")
    steering = jnp.asarray(steering)
  order = np.argsort([len(s) for s in sequences], kind="stable")
  outputs = []
  for start in range(0, len(order), batch_size):
    batch = [sequences[i] for i in order[start:start + batch_size]]
    tokens, lengths = _pad(batch, bucket_length(max(map(len, batch))), batch_size)
    outputs.append(capture_last_token(params, config, parallel.put_batch(mesh, tokens),
                                      parallel.put_batch(mesh, lengths), steering, mesh=mesh))
  captured = np.concatenate([parallel.to_host(x) for x in outputs])[:len(order)]
  result = np.empty_like(captured)
  result[order] = captured
  return result


# --- generation -------------------------------------------------------------------------------

def _banned_ngrams(generated: jax.Array, t: jax.Array, n: int, vocab: int) -> jax.Array:
  """bool[B, vocab]: tokens that would repeat an n-gram of the reply so far.

  generated int32[B, T] holds t tokens per row (the rest is padding): a token is banned where
  the last n - 1 tokens occurred earlier followed by it (Paulus et al.'s no-repeat n-grams).
  """
  B, T = generated.shape
  M = T - n + 1  # window starts
  last = jax.lax.dynamic_slice_in_dim(generated, jnp.maximum(t - n + 1, 0), n - 1, axis=1)
  windows = jnp.stack([generated[:, k:k + M] for k in range(n - 1)], -1)  # [B, M, n - 1]
  follow = generated[:, n - 1:n - 1 + M]  # [B, M]
  hit = (windows == last[:, None]).all(-1) & (jnp.arange(M) + n - 1 < t)[None] & (t >= n - 1)
  return jnp.zeros((B, vocab), jnp.int32).at[jnp.arange(B)[:, None], follow].max(
      hit.astype(jnp.int32)) > 0


def _next_token(logits, key, seen, generated, t, temperature, top_p, penalty, *, sample: bool,
                ngram: int):
  # key: [B] keys, one per row, so a row samples the same alone or in any batch.
  """One decoding step for f32[B, vocab] logits -> int32[B]: repetition penalty on `seen`
  tokens (Keskar et al.: positive logits divided, negative multiplied), n-gram ban, then
  argmax, or temperature and nucleus (top-p) sampling."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
  if ngram:
    logits = jnp.where(_banned_ngrams(generated, t, ngram, logits.shape[-1]), -jnp.inf, logits)
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  order = jnp.argsort(-logits, axis=-1)
  ranked = jnp.take_along_axis(logits, order, -1)
  probs = jax.nn.softmax(ranked, -1)
  outside = jnp.cumsum(probs, -1) - probs > top_p  # the top token always stays
  ranked = jnp.where(outside, -jnp.inf, ranked)
  choice = jax.vmap(jax.random.categorical)(key, ranked)  # one key per row
  return jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample", "ngram"))
def _generate(params, config, tokens, n_pad, steering, adapters, eos_ids, key, temperature,
              top_p, penalty, max_new_tokens: int, sample: bool, ngram: int):
  """Left-padded prompts int32[B, P] -> generated int32[B, max_new_tokens]."""
  B, P = tokens.shape
  slots = jnp.arange(P, dtype=jnp.int32)[None]
  prompt_mask = slots >= n_pad[:, None]
  lengths = P - n_pad  # real prompt lengths = position of the first generated token
  choose = functools.partial(_next_token, temperature=temperature, top_p=top_p,
                             penalty=penalty, sample=sample, ngram=ngram)

  prefill = forward(params, config, tokens, jnp.maximum(slots - n_pad[:, None], 0),
                    attention_mask=prompt_mask, steering=steering, adapters=adapters,
                    logits_positions=jnp.full((B, 1), P - 1), return_kv=True)
  grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
  keys, values = grow(prefill.kv_cache.keys), grow(prefill.kv_cache.values)
  mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens)))
  generated = jnp.zeros((B, max_new_tokens), jnp.int32)
  seen = jnp.zeros((B, prefill.logits.shape[-1]), bool)
  at_step = jax.vmap(jax.random.fold_in, in_axes=(0, None))  # [B] row keys, step -> [B] keys
  token = choose(prefill.logits[:, 0], at_step(key, 0), seen, generated, jnp.int32(0))
  generated = generated.at[:, 0].set(token)
  seen = seen.at[jnp.arange(B), token].set(True)
  done = jnp.isin(token, eos_ids)

  def cond(state):
    t, *_, done = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def step(state):
    t, token, keys, values, mask, generated, seen, done = state
    out = forward(params, config, token[:, None], (lengths + t - 1)[:, None],
                  kv_cache=KVCache(keys, values, mask), steering=steering, adapters=adapters,
                  return_kv=True)
    slot = P + t - 1
    keys = jax.lax.dynamic_update_slice_in_dim(keys, out.kv_cache.keys, slot, axis=2)
    values = jax.lax.dynamic_update_slice_in_dim(values, out.kv_cache.values, slot, axis=2)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((B, 1), bool), slot, axis=1)
    token = jnp.where(done, 0, choose(out.logits[:, 0], at_step(key, t), seen, generated, t))
    generated = jax.lax.dynamic_update_slice_in_dim(generated, token[:, None], t, axis=1)
    seen = seen.at[jnp.arange(B), token].set(True)
    return t + 1, token, keys, values, mask, generated, seen, done | jnp.isin(token, eos_ids)

  state = (jnp.int32(1), token, keys, values, mask, generated, seen, done)
  state = jax.lax.while_loop(cond, step, state)
  return state[5]


def generate(params: Params, config: ModelConfig, prompts: Sequence, max_new_tokens: int, *,
             steering=None, adapters: dict | None = None, temperature: float = 0.0,
             top_p: float = 1.0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, seed: int | Sequence[int] = 0,
             eos_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """Continues each prompt with a key/value cache: greedy, or sampled if temperature > 0.

  prompts: B token-id sequences (ragged: left-padded internally).
  steering: None, [layers, heads, head_dim] or [B, layers, heads, head_dim]; applied to the
    prompt and every generated token.
  adapters: None or forward-form LoRA factors `{target: {"a": [layers, in, rank], "b":
    [layers, rank, out]}}` shared by every prompt (e.g. a DPO profile's), or with a leading
    [B] axis (one per prompt), in every forward pass, so the cache holds the adapted keys and
    values. Rows are independent: a row's output does not depend on the others'.
  temperature: 0 = greedy; top_p: nucleus sampling (1 = off); repetition_penalty: tokens
    already generated have positive logits divided by it and negative ones multiplied (1 =
    off); no_repeat_ngram_size: n > 1 bans any token that would repeat an n-gram of the reply
    (0 = off).
  seed: PRNG seed for sampling, one for every row or one per row (a row's seed, prompt and
    settings give the same output alone or in any batch). eos_ids: generation of a row stops
    after it emits one of these (the eos token is included in its output).
  -> B int32 arrays of generated ids (at most max_new_tokens each).
  """
  prompts = _check_sequences(prompts, config, "prompts")
  if max_new_tokens < 1:
    raise UserInputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise UserInputError(f"generate: temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise UserInputError(f"generate: top_p must be in (0, 1], got {top_p}")
  if repetition_penalty < 1:
    raise UserInputError(f"generate: repetition_penalty must be >= 1, got {repetition_penalty}")
  if no_repeat_ngram_size == 1 or no_repeat_ngram_size < 0:
    raise UserInputError(f"generate: no_repeat_ngram_size must be 0 (off) or >= 2, got "
                         f"{no_repeat_ngram_size}")
  if steering is not None:
    _check_steering(steering, config, [(), (len(prompts),)], "generate")
    steering = jnp.asarray(steering)
  if adapters is not None:
    try:
      lead = check_adapters(adapters, config)
    except ValueError as err:
      raise UserInputError(f"generate: {err}") from None
    if lead not in (None, len(prompts)):
      raise UserInputError(f"generate: adapters need no leading axis or one of {len(prompts)} "
                           f"(one per prompt), got {lead}")
    adapters = jax.tree.map(jnp.asarray, adapters)
  length = bucket_length(max(map(len, prompts)))
  tokens, lengths = _pad(prompts, length, left=True)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seeds = np.broadcast_to(np.asarray(seed, np.uint32), (len(prompts),))
  ngram = no_repeat_ngram_size if no_repeat_ngram_size <= max_new_tokens else 0
  generated = np.asarray(_generate(
      params, config, jnp.asarray(tokens), jnp.asarray(length - lengths), steering, adapters, eos,
      jax.vmap(jax.random.key)(seeds), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
      jnp.float32(repetition_penalty), max_new_tokens=max_new_tokens, sample=temperature > 0,
      ngram=ngram))
  out = []
  for row in generated:
    stop = np.flatnonzero(np.isin(row, list(eos_ids)))
    out.append(row[:stop[0] + 1] if stop.size else row)
  return out
