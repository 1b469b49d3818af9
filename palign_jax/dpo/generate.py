"""Text generation with a LoRA adapter: what `launch.chat` answers with for a DPO profile.

`scoring.generate` steers but takes no adapters; this is the same key/value-cached loop (left
padding to a length bucket, prefill, one token per step until an end-of-sequence id) with the
adapter passed to every `llama.forward` call, the prompt's and each new token's, so the cache
holds the adapted keys and values. Without an adapter it gives `scoring.generate`'s tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import KVCache, check_adapters, forward
from palign_jax.models.params import Params
from palign_jax.scoring import bucket_length


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample"))
def _generate(params, config, tokens, n_pad, steering, adapters, eos_ids, key, temperature,
              max_new_tokens: int, sample: bool):
  """Left-padded prompts int32[B, P] -> generated int32[B, max_new_tokens] (0 after an eos)."""
  B, P = tokens.shape
  slots = jnp.arange(P, dtype=jnp.int32)[None]
  prompt_mask = slots >= n_pad[:, None]
  lengths = P - n_pad  # real prompt lengths = position of the first generated token

  def choose(logits, key):
    if sample:
      return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  prefill = forward(params, config, tokens, jnp.maximum(slots - n_pad[:, None], 0),
                    attention_mask=prompt_mask, steering=steering, adapters=adapters,
                    logits_positions=jnp.full((B, 1), P - 1), return_kv=True)
  grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
  keys, values = grow(prefill.kv_cache.keys), grow(prefill.kv_cache.values)
  mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens)))
  key, sub = jax.random.split(key)
  token = choose(prefill.logits[:, 0], sub)
  generated = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos_ids)

  def cond(state):
    t, *_, done, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def step(state):
    t, token, keys, values, mask, generated, done, key = state
    out = forward(params, config, token[:, None], (lengths + t - 1)[:, None],
                  kv_cache=KVCache(keys, values, mask), steering=steering, adapters=adapters,
                  return_kv=True)
    slot = P + t - 1
    keys = jax.lax.dynamic_update_slice_in_dim(keys, out.kv_cache.keys, slot, axis=2)
    values = jax.lax.dynamic_update_slice_in_dim(values, out.kv_cache.values, slot, axis=2)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((B, 1), bool), slot, axis=1)
    key, sub = jax.random.split(key)
    token = jnp.where(done, 0, choose(out.logits[:, 0], sub))
    generated = jax.lax.dynamic_update_slice_in_dim(generated, token[:, None], t, axis=1)
    return t + 1, token, keys, values, mask, generated, done | jnp.isin(token, eos_ids), key

  state = (jnp.int32(1), token, keys, values, mask, generated, done, key)
  return jax.lax.while_loop(cond, step, state)[5]


def generate(params: Params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, adapters: dict | None = None,
             steering: np.ndarray | None = None, temperature: float = 0.0, seed: int = 0,
             eos_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """Continues each prompt, greedy (or sampled if temperature > 0), under one adapter.

  prompts: B token-id sequences (ragged; left-padded internally to a length bucket).
  adapters: None or forward-form LoRA factors `{target: {"a": [layers, in, rank], "b":
    [layers, rank, out]}}` shared by every prompt (e.g. a DPO profile's).
  steering: None or `[layers, heads, head_dim]`, added at every position as in `scoring`.
  -> B int32 arrays of generated ids, each ending at its first eos id (included), at most
  max_new_tokens long.
  """
  prompts = [np.asarray(p, np.int32) for p in prompts]
  if not prompts or min(map(len, prompts)) < 1:
    raise UserInputError("generate: needs at least one non-empty prompt")
  if max_new_tokens < 1:
    raise UserInputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise UserInputError(f"generate: temperature must be >= 0, got {temperature}")
  if adapters is not None:
    try:
      lead = check_adapters(adapters, config)
    except ValueError as err:
      raise UserInputError(f"generate: {err}") from None
    if lead is not None:
      raise UserInputError(f"generate: one adapter shared by every prompt, without a leading "
                           f"axis (got one of {lead})")
    adapters = jax.tree.map(jnp.asarray, adapters)
  if steering is not None:
    expected = (config.num_layers, config.num_heads, config.head_dim)
    if tuple(np.shape(steering)) != expected:
      raise UserInputError(f"generate: steering has shape {np.shape(steering)}, expected "
                           f"{expected}")
    steering = jnp.asarray(steering, jnp.float32)
  P = bucket_length(max(map(len, prompts)))
  tokens = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = p
  n_pad = np.array([P - len(p) for p in prompts], np.int32)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  generated = np.asarray(_generate(
      params, config, jnp.asarray(tokens), jnp.asarray(n_pad), steering, adapters, eos,
      jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), max_new_tokens=max_new_tokens,
      sample=temperature > 0))
  out = []
  for row in generated:
    stop = np.flatnonzero(np.isin(row, list(eos_ids)))
    out.append(row[:stop[0] + 1] if stop.size else row)
  return out
