"""The Gemma 3 text decoder, on the blocks of `llama.py` where they are the same.

Owns what Gemma 3 does differently from the Llama family:
  * RMSNorm on every query and key head (`q_norm`, `k_norm`, over head_dim) before RoPE;
  * four norms per layer: before and after attention, before and after the MLP (the "after"
    ones norm the block's output before it joins the residual stream);
  * Gemma's RMSNorm (multiply in float32, then cast; checkpoints store `scale - 1`);
  * embeddings multiplied by sqrt(hidden) (in the parameter dtype, as transformers does);
  * local layers that attend only to keys fewer than `sliding_window` positions back, every
    layer but each `sliding_window_pattern`-th (global) one, each kind with its RoPE base;
  * attention scores scaled by `query_pre_attn_scalar ** -0.5`, and optional soft-capping of
    the logits (`config.final_logit_softcapping`; the scores' soft-capping of Gemma 2 is in
    transformers' Gemma 3 config but its model never applies it, nor does this one).
Shared with `llama.py`: the fused q/k/v projection, the attention kernels (einsums or
`jax.nn.dot_product_attention`), PAS steering and capture at the o_proj input
(`llama.output_heads`), the gated MLP (GeGLU through `config.hidden_activation`), the tied
output embedding, LoRA side paths, the `KVCache` and the whole `forward` contract:
`llama.forward` runs this module when `config.architecture == "gemma3"`.

The sliding window is measured in positions, not cache slots. A cache's valid slots are the
sequence from its start (the contract `llama.forward` states): the k-th valid slot is at
position k, so left or right padding and per-row prefixes shift nothing. Every layer kind
keeps every key (no ring buffer); a local layer masks the ones out of its window. Layers are
scanned, so a per-layer flag `local` [layers] picks each layer's masks and RoPE tables
(`jnp.where` on [B,T,S] masks and [B,T,H] tables, small next to the scores).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import (
    Embed,
    ForwardOutput,
    KVCache,
    Mlp,
    RMSNorm,
    _low_rank,
    _rotate,
    attend,
    output_heads,
    output_logits,
    project_qkv,
    rope_inverse_frequencies,
    rope_tables,
    scanned_layer_inputs,
    self_attention_mask,
)


def _norm(c: ModelConfig, dt, name: str) -> RMSNorm:
  return RMSNorm(c.rms_norm_eps, dt, scale_in_float32=True, name=name)


def cache_positions(cache_mask: jax.Array) -> jax.Array:
  """int32[Bc,S]: the position of each valid cache slot (the k-th valid slot is position k)."""
  return jnp.cumsum(cache_mask.astype(jnp.int32), axis=1) - 1


def window_masks(window: int, positions: jax.Array, self_mask: jax.Array,
                 cache_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """A local layer's masks: keys fewer than `window` positions before the query.

  positions int[B,T], self_mask bool[B,T,T], cache_mask None or bool[Bc,S]
  -> (bool[B,T,T], None or bool[B,T,S]: per query, as `llama._attention` takes it).
  """
  near = lambda query, key: query[:, :, None] - key[:, None, :] < window
  local_self = self_mask & near(positions, positions)
  if cache_mask is None:
    return local_self, None
  local_cache = cache_mask[:, None, :] & near(positions, cache_positions(cache_mask))
  return local_self, local_cache


class GemmaAttention(nn.Module):
  """Grouped-query attention with q/k norms, the layer's window and RoPE, PAS's steering and
  capture, and LoRA side paths (added to q/k/v before the norms, which are not linear)."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shared, layer):
    c, dt = self.config, self.param_dtype
    x = x.astype(dt)
    q, k, v = project_qkv(c, dt, x)
    adapters = layer.get("adapters")
    if adapters:
      dq, dk, dv = (_low_rank(adapters, name, x) for name in ("q_proj", "k_proj", "v_proj"))
      q = q if dq is None else q + dq.reshape(q.shape)
      k = k if dk is None else k + dk.reshape(k.shape)
      v = v if dv is None else v + dv.reshape(v.shape)
    q, k = _norm(c, dt, "q_norm")(q), _norm(c, dt, "k_norm")(k)
    local = layer["local"]  # bool[]: this layer attends through the sliding window
    pick = lambda name: (shared[name] if shared.get(name + "_local") is None
                         else jnp.where(local, shared[name + "_local"], shared[name]))
    cos, sin = pick("cos"), pick("sin")
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    cache = None
    if layer.get("cache_k") is not None:
      cache = (layer["cache_k"], layer["cache_v"], pick("cache_mask"))
    out = attend(c, dt, q, k, v, pick("self_mask"), cache)
    B, T = q.shape[:2]
    y, captured = output_heads(c, dt, out.reshape(B, T, c.num_heads, c.head_dim), shared, layer)
    return y, captured, k, v


class GemmaDecoderLayer(nn.Module):
  """One block: x + post_norm(attn(pre_norm x)), then the same around the MLP; scanned."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shared, layer):
    c, dt = self.config, self.param_dtype
    h = _norm(c, dt, "input_layernorm")(x)
    attn, captured, k, v = GemmaAttention(c, dt, name="attn")(h, shared, layer)
    x = x + _norm(c, dt, "post_attention_layernorm")(attn)
    h = Mlp(c, dt, name="mlp")(_norm(c, dt, "pre_feedforward_layernorm")(x))
    x = x + _norm(c, dt, "post_feedforward_layernorm")(h)
    return x, (captured, k, v)


class Gemma3(nn.Module):
  """The Gemma 3 decoder, called like `llama.Llama` (use through `llama.forward`)."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, positions, attention_mask=None, kv_cache=None, steering=None,
               capture_positions=None, logits_positions=None, vocab_subset=None,
               return_logits=True, return_kv=False, adapters=None):
    c, dt = self.config, self.param_dtype
    B, T = tokens.shape
    embed = Embed(c.vocab_size, c.hidden_size, dt, name="embed_tokens")
    x = embed(tokens) * jnp.asarray(c.hidden_size ** 0.5, dt)
    if attention_mask is None:
      attention_mask = jnp.ones((B, T), bool)
    cos, sin = rope_tables(positions, rope_inverse_frequencies(c))
    cache_mask = None if kv_cache is None else kv_cache.mask
    shared = {
        "cos": cos, "sin": sin,
        "self_mask": self_attention_mask(attention_mask),
        "capture_positions": capture_positions,
        "cache_mask": cache_mask,
    }
    local = jnp.asarray(c.sliding_layers())
    if any(c.sliding_layers()):
      cos_local, sin_local = rope_tables(positions, rope_inverse_frequencies(c, local=True))
      self_local, cache_local = window_masks(c.sliding_window, positions, shared["self_mask"],
                                             cache_mask)
      shared.update(cos_local=cos_local, sin_local=sin_local, self_mask_local=self_local)
      if cache_local is not None:  # a global layer's mask, per query like the local one
        shared["cache_mask"] = jnp.broadcast_to(cache_mask[:, None, :], cache_local.shape)
        shared["cache_mask_local"] = cache_local
    layer = scanned_layer_inputs(c, kv_cache, steering, adapters) | {"local": local}
    layers = nn.scan(
        GemmaDecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, 0), length=c.num_layers)(c, dt, name="layers")
    x, (captured, keys, values) = layers(x, shared, layer)

    logits = None
    if return_logits:
      logits = output_logits(c, dt, x, _norm(c, dt, "norm"), embed, logits_positions,
                             vocab_subset)
    head_outputs = None if captured is None else jnp.moveaxis(captured, 0, 1)
    kv = KVCache(keys, values, attention_mask) if return_kv else None
    return ForwardOutput(logits, head_outputs, kv)
