"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as a pure forward function.

Owns the architecture: RMSNorm, RoPE (with Llama 3 frequency scaling), grouped-query attention
with an optional key/value prefix cache, SwiGLU MLP, tied or untied output embeddings, and the
two PAS interventions on the per-head attention output (`BTNH`, the input of `o_proj`):
additive steering and capture, and optional low-rank adapters (LoRA) on the attention
projections as a side path for the DPO baseline.

Why Flax linen: the model is a pure `Llama(config).apply({'params': params}, ...)` over the plain
nested-dict pytree that `palign_jax.models.params` defines and every loader produces, so loading
is a pytree conversion, and `jit`, `vmap` and sharding act on ordinary arrays with no module
state to split or merge. `nn.scan` runs one `DecoderLayer` over parameters stacked on a leading
`layers` axis, so compile time is that of one layer, not `num_layers`.

Everything PAS needs is a plain argument of `forward`, so `vmap` can batch it:
  * `steering` `[layers, heads, head_dim]` (or `[batch, layers, heads, head_dim]`) is added to
    every head's output at every position, just before `o_proj`. Adding `delta` there is the same
    as giving `o_proj` a bias `W_o . delta`.
  * `capture_positions` `[batch]` returns the per-head outputs (after steering, i.e. exactly what
    `o_proj` reads) at one position per row: `head_outputs` `[batch, layers, heads, head_dim]`.
  * `kv_cache` is a prefix to attend to (keys/values of earlier tokens and their validity mask).
    A cache with batch size 1 is shared by every row, without being copied (prefix-shared
    scoring).
  * `logits_positions` / `vocab_subset` compute logits only where and for what is needed.
  * `adapters` are LoRA factors for some of q/k/v/o_proj, `{target: {"a": [layers, in, rank],
    "b": [layers, rank, out]}}` (or with a leading batch axis on every leaf), applied as a side
    path `y += (x a) b` next to the frozen kernel, which is never merged or copied. Inputs and
    outputs are the projections' flattened axes: `in` is hidden (q/k/v) or heads * head_dim
    (o), `out` is heads * head_dim (q), kv_heads * head_dim (k/v) or hidden (o). The LoRA scale
    is folded into `b` by the caller (`palign_jax.dpo.lora.for_forward`).

Numerics follow Hugging Face: RMSNorm and softmax in float32, the rest in the parameter dtype
(float32 or bfloat16) with float32 accumulation in attention, logits returned in float32.
Attention runs as einsums that never transpose or broadcast the scores (the CPU's fastest), or
through `jax.nn.dot_product_attention` (cuDNN's flash kernel on a GPU):
`attention_implementation` chooses, `config.attention` overrides. Mistral's sliding window is
not implemented (it only matters beyond 4,096 tokens).

Gemma 3 (`gemma.py`) is built from this module's blocks (`project_qkv`, `attend`,
`output_heads`, `Mlp`, `output_logits`, ...); `forward` runs it when `config.architecture` is
"gemma3" (`decoder_class`), so scoring, the engine and generation call one entry point.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from palign_jax.models.config import ModelConfig
from palign_jax.models.params import Params

_MASKED = -1e30  # finite, so a fully masked row (a padding query) gives no NaN
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # projections LoRA may adapt


class KVCache(NamedTuple):
  """Keys/values of earlier tokens (RoPE already applied) and which slots are real."""

  keys: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
  values: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
  mask: jax.Array  # bool[batch, slots]


class ForwardOutput(NamedTuple):
  """What `forward` returns; fields not asked for are None."""

  logits: jax.Array | None  # f32[batch, T or P, vocab or len(vocab_subset)]
  head_outputs: jax.Array | None  # [batch, layers, heads, head_dim] at capture_positions
  kv_cache: KVCache | None  # keys/values of this call's tokens, mask = attention_mask


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
  """f32[head_dim // 2], computed in float32 like transformers (incl. Llama 3 scaling).

  local: the frequencies of Gemma 3's sliding-window layers (base `rope_local_theta`, never
  scaled); otherwise base `rope_theta` with the config's scaling (Llama 3, or linear).
  """
  dim = config.head_dim
  theta = config.rope_local_theta if local else config.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents))
  inv_freq = inv_freq.astype(np.float32)
  if local:
    return inv_freq
  if config.rope_linear_factor != 1.0:
    inv_freq = (inv_freq / np.float32(config.rope_linear_factor)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies RoPE in the Hugging Face "rotate half" layout. x [B,T,...,H], cos/sin [B,T,H]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  heads = (slice(None), slice(None)) + (None,) * (x.ndim - 3)  # [B,T,H] -> [B,T,1..,H]
  cos, sin = cos[heads].astype(x.dtype), sin[heads].astype(x.dtype)
  return x * cos + rotated * sin


def _normal(stddev: float = 0.02):
  return nn.initializers.normal(stddev)


def _counting_cache(cache_k, cache_v, cache_mask):
  """A per-slot cache (mask bool[Bc,S]) rewritten so its scores need no mask: each hidden slot's
  key becomes its row's first visible key (zeros if none), so the maximum over all slots is the
  visible slots' maximum, and values gain a last column, the slot's visibility, with hidden
  slots' values zeroed, so `p @ values` gives the softmax numerator and its denominator at once.
  -> keys [Bc,S,K,H], values [Bc,S,K,H+1]."""
  visible = cache_mask[:, :, None, None]
  first = jnp.take_along_axis(cache_k, jnp.argmax(cache_mask, axis=1)[:, None, None, None], 1)
  first = jnp.where(jnp.any(cache_mask, axis=1)[:, None, None, None], first, 0)
  count = jnp.broadcast_to(visible, cache_v.shape[:3] + (1,)).astype(cache_v.dtype)
  return (jnp.where(visible, cache_k, first),
          jnp.concatenate([jnp.where(visible, cache_v, 0), count], axis=-1))


def _attention(q, k, v, self_mask, cache=None, scale=None):
  """Softmax attention of q over [cache slots; own tokens].

  q [B,T,K,G,H] (G query heads per kv head), k/v [B,T,K,H], self_mask bool[B,T,T];
  cache: None or (keys [Bc,S,K,H], values [Bc,S,K,H], mask) with Bc in (1, B) and the mask
  bool[Bc,S] (the same slots for every query) or bool[Bm,T,S] with Bm in (1, B) (per query:
  Gemma's sliding window); scale: the scores' factor (default 1 / sqrt(H));
  -> [B,T,K,G,H] in v's dtype. The softmax is taken over the two key blocks jointly, without
  concatenating them, so a shared (Bc = 1) prefix is never broadcast to the batch. Score
  layouts are the natural dot_general outputs ("BKTGS", "KBTGS"), so the large score tensors
  are never transposed; only [.., H]-sized results are.

  The cache's scores are the largest tensor of a question batch (float32 `[K,B,T,G,S]`, 40 MB
  a layer for 10 questions on a 1,408-token prefix). When its mask is per slot and the scores
  outnumber the cache (B*T*G > Bc*H: not in one-token decoding), `_counting_cache` takes the
  mask off them: the max and exp read the dot's output directly, and the denominator comes
  out of the value matmul, two passes over that tensor fewer (7-10% less time per question
  batch side by side on a CPU, `benchmarks/RESULTS_pas.md`), the same result up to rounding.
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  f32 = jnp.float32
  q = (q.astype(f32) * scale).astype(q.dtype)  # scaled once here, not on each score
  s_self = jnp.einsum("BTKGH,BSKH->BKTGS", q, k, preferred_element_type=f32)
  s_self = jnp.where(self_mask[:, None, :, None, :], s_self, _MASKED)
  m = jnp.max(s_self, axis=-1, keepdims=True)  # [B,K,T,G,1]
  if cache is not None:
    cache_k, cache_v, cache_mask = cache
    B, T, _, G, H = q.shape
    counting = cache_mask.ndim == 2 and B * T * G > cache_k.shape[0] * H
    if counting:
      cache_k, cache_v = _counting_cache(cache_k, cache_v, cache_mask)
    shared = cache_k.shape[0] == 1 and B > 1
    if shared:  # batch K only; result [K,B,T,G,S]
      s_cache = jnp.einsum("BTKGH,SKH->KBTGS", q, cache_k[0], preferred_element_type=f32)
      to_b, from_b = (lambda x: jnp.swapaxes(x, 0, 1)), (lambda x: jnp.swapaxes(x, 0, 1))
    else:
      s_cache = jnp.einsum("BTKGH,BSKH->BKTGS", q, cache_k, preferred_element_type=f32)
      to_b = from_b = lambda x: x
    if not counting:
      if cache_mask.ndim == 2:  # [Bc,S]: the same slots for every query
        visible = cache_mask[:, None, None, None, :]
      else:  # [Bm,T,S] per query, laid out like the scores
        visible = cache_mask[None, :, :, None, :] if shared else cache_mask[:, None, :, None, :]
      s_cache = jnp.where(visible, s_cache, _MASKED)
    m = jnp.maximum(m, to_b(jnp.max(s_cache, axis=-1, keepdims=True)))
  p_self = jnp.exp(s_self - m)
  denom = jnp.sum(p_self, axis=-1, keepdims=True)
  out = jnp.einsum("BKTGS,BSKH->BKTGH", p_self.astype(v.dtype), v, preferred_element_type=f32)
  if cache is not None:
    p_cache = jnp.exp(s_cache - from_b(m))
    if not counting:
      denom = denom + to_b(jnp.sum(p_cache, axis=-1, keepdims=True))
    p_cache = p_cache.astype(cache_v.dtype)
    if shared:
      cached = to_b(jnp.einsum("KBTGS,SKH->KBTGH", p_cache, cache_v[0],
                               preferred_element_type=f32))
    else:
      cached = jnp.einsum("BKTGS,BSKH->BKTGH", p_cache, cache_v, preferred_element_type=f32)
    if counting:
      cached, denom = cached[..., :-1], denom + cached[..., -1:]
    out = out + cached
  return jnp.transpose(out / denom, (0, 2, 1, 3, 4)).astype(v.dtype)  # -> [B,T,K,G,H]


def attention_implementation(config: ModelConfig, dtype) -> str:
  """The attention kernel `forward` runs (resolved at trace time).

  `config.attention` unless it is "auto": then cuDNN's fused flash kernel on a GPU in half
  precision (it never materialises the `[batch, heads, T, S]` scores), and `_attention`'s
  einsums elsewhere (measured the fastest on a CPU; `benchmarks/RESULTS_scoring.md`). "xla" is
  `jax.nn.dot_product_attention`'s XLA path: the cuDNN call's exact arguments on any backend,
  which is how the CPU tests check them.
  """
  if config.attention != "auto":
    return config.attention
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and half else "einsum"


def _attention_dot_product(q, k, v, self_mask, cache, implementation: str, scale=None):
  """`_attention` through `jax.nn.dot_product_attention` (same arguments and result).

  The prefix (shared or per row) and this call's keys are one key sequence with one boolean
  mask [B,1,T,S+T]; cuDNN turns it into an additive bias of that size, far smaller than the
  scores it never stores.
  """
  B, T, K, G, H = q.shape
  keys, values, mask = k, v, self_mask
  if cache is not None:
    cache_k, cache_v, cache_mask = cache
    S = cache_k.shape[1]
    widen = lambda x: jnp.broadcast_to(x, (B,) + x.shape[1:]).astype(k.dtype)
    keys = jnp.concatenate([widen(cache_k), k], axis=1)
    values = jnp.concatenate([widen(cache_v), v], axis=1)
    per_query = cache_mask if cache_mask.ndim == 3 else cache_mask[:, None, :]
    mask = jnp.concatenate([jnp.broadcast_to(per_query, (B, T, S)), mask], -1)
  # A padding query that sees no key (left padding in generation) would be NaN under an
  # additive mask, and a NaN key poisons every row; seeing itself keeps it finite. Real
  # queries already see themselves, so their results do not change.
  slots = keys.shape[1]
  own = jnp.arange(T)[:, None] + (slots - T) == jnp.arange(slots)[None, :]
  out = jax.nn.dot_product_attention(
      q.reshape(B, T, K * G, H), keys, values, mask=(mask | own)[:, None], scale=scale,
      implementation=implementation)
  return out.reshape(B, T, K, G, H)


def _low_rank(adapters, name: str, x: jax.Array) -> jax.Array | None:
  """The LoRA side path `(x a) b` of projection `name`, or None when it is not adapted.

  x [B,T,in]; a [in,rank] and b [rank,out] shared by the batch, or [B,in,rank] / [B,rank,out]
  one per row -> [B,T,out] in x's dtype. Two thin matmuls, so the adapted kernel is never
  formed (it would be a [in, out] copy per row).
  """
  factors = adapters.get(name) if adapters else None
  if factors is None:
    return None
  a, b = factors["a"].astype(x.dtype), factors["b"].astype(x.dtype)
  if a.ndim == 2:
    return jnp.einsum("BTR,RO->BTO", jnp.einsum("BTI,IR->BTR", x, a), b)
  return jnp.einsum("BTR,BRO->BTO", jnp.einsum("BTI,BIR->BTR", x, a), b)


class Einsum(nn.Module):
  """A projection written as a named einsum, with an optional bias on the output's last axes."""

  kernel_shape: tuple[int, ...]
  equation: str
  bias_shape: tuple[int, ...] | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _normal(), self.kernel_shape, self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(kernel.dtype), kernel)
    if self.bias_shape is not None:
      y = y + self.param("bias", nn.initializers.zeros, self.bias_shape, self.param_dtype)
    return y


class Weights(nn.Module):
  """A kernel (and optional bias) used by the parent's own einsum, e.g. fused with others."""

  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...] | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _normal(), self.kernel_shape, self.param_dtype)
    bias = None
    if self.bias_shape is not None:
      bias = self.param("bias", nn.initializers.zeros, self.bias_shape, self.param_dtype)
    return kernel, bias


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned multiplier `scale`.

  Llama casts the normalised x to x's dtype, then multiplies; Gemma (`scale_in_float32`)
  multiplies in float32, then casts (its checkpoints store `scale - 1`, added back at load).
  """

  eps: float
  param_dtype: Any = jnp.float32
  scale_in_float32: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.scale_in_float32:
      return (x32 * scale.astype(jnp.float32)).astype(x.dtype)
    return scale * x32.astype(x.dtype)


def project_qkv(c: ModelConfig, dt, x: jax.Array):
  """q [B,T,K,G,H], k and v [B,T,K,H] of x [B,T,D] in one matmul, from weights stored fused
  (`params.py`). Call from an attention module's compact `__call__`: its `qkv_proj` lives there.
  """
  D, K, H, G = c.hidden_size, c.num_kv_heads, c.head_dim, c.num_query_groups
  bias = c.attention_bias
  w_qkv, b_qkv = Weights((D, K, G + 2, H), (K, G + 2, H) if bias else None, dt,
                         name="qkv_proj")()
  qkv = jnp.einsum("BTD,DKJH->BTKJH", x.astype(dt), w_qkv)
  if bias:
    qkv = qkv + b_qkv
  # query head n = k * G + g reads kv head k
  return qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]  # BTKGH, BTKH, BTKH


def attend(c: ModelConfig, dt, q, k, v, self_mask, cache):
  """`_attention` (or `_attention_dot_product`, per `attention_implementation`) with the
  config's score scale (Gemma's `query_pre_attn_scalar`): q [B,T,K,G,H] -> [B,T,K,G,H]."""
  out, implementation = None, attention_implementation(c, dt)
  # None: the kernels' own 1 / sqrt(head_dim)
  scale = None if c.query_pre_attn_scalar is None else 1.0 / math.sqrt(c.query_pre_attn_scalar)
  if implementation != "einsum":
    try:
      out = _attention_dot_product(q, k, v, self_mask, cache, implementation, scale)
    except (RuntimeError, ValueError, NotImplementedError) as err:
      if c.attention != "auto":
        raise
      # cuDNN refuses some shapes and versions at trace time; "auto" then keeps running.
      warnings.warn(f"cuDNN attention unavailable ({err}); using the einsum attention",
                    stacklevel=2)
  if out is None:
    out = _attention(q, k, v, self_mask, cache, scale)
  return out


def output_heads(c: ModelConfig, dt, heads, shared, layer):
  """PAS's place: steering added to heads [B,T,N,H] (what o_proj reads), capture at
  `shared["capture_positions"]`, then o_proj (and its LoRA side path) -> (y [B,T,D], captured
  [B,N,H] or None). Call from an attention module's compact `__call__` (`o_proj` lives there).
  """
  B, T, N, H = heads.shape
  steering = layer.get("steering")
  if steering is not None:
    delta = steering[None, None] if steering.ndim == 2 else steering[:, None]
    heads = heads + delta.astype(heads.dtype)
  captured = None
  if shared.get("capture_positions") is not None:
    captured = heads[jnp.arange(B), shared["capture_positions"]]  # [B,N,H]
  y = Einsum((N, H, c.hidden_size), "BTNH,NHD->BTD", None, dt, name="o_proj")(heads)
  adapters = layer.get("adapters")
  if adapters and adapters.get("o_proj") is not None:
    y = y + _low_rank(adapters, "o_proj", heads.reshape(B, T, N * H))
  return y, captured


class Attention(nn.Module):
  """Grouped-query self-attention over [cache; this call's tokens], with PAS steering/capture
  and optional LoRA side paths on q/k/v/o_proj."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shared, layer):
    c, dt = self.config, self.param_dtype
    N, H = c.num_heads, c.head_dim
    x = x.astype(dt)
    q, k, v = project_qkv(c, dt, x)
    q = _rotate(q, shared["cos"], shared["sin"])
    k = _rotate(k, shared["cos"], shared["sin"])
    adapters = layer.get("adapters")
    if adapters:
      # LoRA side paths. RoPE is linear, rotate(q + d) = rotate(q) + rotate(d), so q and k's
      # deltas are rotated on their own and added after it: the base model's ops stay exactly
      # as without adapters, and a zero `b` reproduces the base model bit for bit.
      dq, dk, dv = (_low_rank(adapters, name, x) for name in ("q_proj", "k_proj", "v_proj"))
      rope = lambda d, y: _rotate(d.reshape(y.shape), shared["cos"], shared["sin"])
      q = q if dq is None else q + rope(dq, q)
      k = k if dk is None else k + rope(dk, k)
      v = v if dv is None else v + dv.reshape(v.shape)
    B, T = q.shape[:2]
    cache = None
    if layer.get("cache_k") is not None:
      cache = (layer["cache_k"], layer["cache_v"], shared["cache_mask"])
    out = attend(c, dt, q, k, v, shared["self_mask"], cache)
    y, captured = output_heads(c, dt, out.reshape(B, T, N, H), shared, layer)
    return y, captured, k, v


_ACTIVATIONS = {"silu": nn.silu,  # SwiGLU
                "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}  # GeGLU


class Mlp(nn.Module):
  """Gated MLP: down(act(gate x) * up x), act = `config.hidden_activation`."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    D, F, dt = self.config.hidden_size, self.config.intermediate_size, self.param_dtype
    w_gate_up, _ = Weights((D, 2, F), None, dt, name="gate_up_proj")()  # stored fused
    gate_up = jnp.einsum("BTD,DJF->BTJF", x.astype(dt), w_gate_up)
    hidden = _ACTIVATIONS[self.config.hidden_activation](gate_up[:, :, 0]) * gate_up[:, :, 1]
    return Einsum((F, D), "BTF,FD->BTD", None, dt, name="down_proj")(hidden)


class DecoderLayer(nn.Module):
  """One pre-norm block; scanned over the leading `layers` axis of its parameters."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shared, layer):
    c, dt = self.config, self.param_dtype
    h = RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(x)
    attn, captured, k, v = Attention(c, dt, name="attn")(h, shared, layer)
    x = x + attn
    h = RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(x)
    x = x + Mlp(c, dt, name="mlp")(h)
    return x, (captured, k, v)


class Embed(nn.Module):
  vocab_size: int
  hidden_size: int
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", _normal(), (self.vocab_size, self.hidden_size),
                                self.param_dtype)

  def __call__(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0)

  def embedding_matrix(self):
    return self.embedding


class LMHead(nn.Module):
  hidden_size: int
  vocab_size: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("kernel", _normal(), (self.hidden_size, self.vocab_size), self.param_dtype)


def output_logits(c: ModelConfig, dt, x, norm, embed, logits_positions, vocab_subset):
  """f32 logits [B,P,V'] of the last hidden states x [B,T,D]: rows at `logits_positions`
  (None: every position), `norm`, the tied embedding or `lm_head`, columns `vocab_subset`,
  then the config's final soft-capping. Call from the model's compact `__call__`."""
  if logits_positions is not None:
    x = jnp.take_along_axis(x, logits_positions[..., None], axis=1)  # [B,P,D]
  x = norm(x)
  if c.tie_word_embeddings:  # [vocab, hidden]; rows picked before any transpose
    weights, equation, vocab_axis = embed.embedding_matrix(), "BPD,VD->BPV", 0
  else:
    weights = LMHead(c.hidden_size, c.vocab_size, dt, name="lm_head")()
    equation, vocab_axis = "BPD,DV->BPV", 1
  if vocab_subset is not None:
    weights = jnp.take(weights, vocab_subset, axis=vocab_axis)
  logits = jnp.einsum(equation, x.astype(weights.dtype), weights,
                      preferred_element_type=jnp.float32)
  cap = c.final_logit_softcapping  # Gemma's soft-capping
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos, sin f32[B,T,H] of positions int[B,T] (both halves of a head share a frequency)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def self_attention_mask(attention_mask: jax.Array) -> jax.Array:
  """bool[B,T(query),T(key)]: causal, and only real tokens (attention_mask bool[B,T]) as keys."""
  T = attention_mask.shape[1]
  return jnp.tril(jnp.ones((T, T), bool))[None] & attention_mask[:, None, :]


def scanned_layer_inputs(c: ModelConfig, kv_cache, steering, adapters) -> dict:
  """The per-layer inputs of the scan, each with a leading `layers` axis: steering, adapters
  (per-row leaves moved from [B,L,..] to [L,B,..]) and the cache's keys/values."""
  if steering is not None and steering.ndim == 4:
    steering = jnp.moveaxis(steering, 1, 0)  # [B,L,N,H] -> [L,B,N,H]: scanned over layers
  if adapters is not None and check_adapters(adapters, c) is not None:
    # [B,L,in,r] -> [L,B,in,r]: scanned over layers
    adapters = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), adapters)
  return {
      "steering": steering,
      "adapters": adapters,
      "cache_k": None if kv_cache is None else kv_cache.keys,
      "cache_v": None if kv_cache is None else kv_cache.values,
  }


class Llama(nn.Module):
  """The decoder. Use through `forward`; `init` gives the `params.py` layout (random values)."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, positions, attention_mask=None, kv_cache=None, steering=None,
               capture_positions=None, logits_positions=None, vocab_subset=None,
               return_logits=True, return_kv=False, adapters=None):
    c, dt = self.config, self.param_dtype
    B, T = tokens.shape
    embed = Embed(c.vocab_size, c.hidden_size, dt, name="embed_tokens")
    x = embed(tokens)

    cos, sin = rope_tables(positions, rope_inverse_frequencies(c))
    if attention_mask is None:
      attention_mask = jnp.ones((B, T), bool)
    shared = {
        "cos": cos, "sin": sin,
        "self_mask": self_attention_mask(attention_mask),
        "capture_positions": capture_positions,
        "cache_mask": None if kv_cache is None else kv_cache.mask,
    }
    layer = scanned_layer_inputs(c, kv_cache, steering, adapters)
    layers = nn.scan(
        DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, 0), length=c.num_layers)(c, dt, name="layers")
    x, (captured, keys, values) = layers(x, shared, layer)

    logits = None
    if return_logits:
      norm = RMSNorm(c.rms_norm_eps, dt, name="norm")
      logits = output_logits(c, dt, x, norm, embed, logits_positions, vocab_subset)
    head_outputs = None if captured is None else jnp.moveaxis(captured, 0, 1)
    kv = KVCache(keys, values, attention_mask) if return_kv else None
    return ForwardOutput(logits, head_outputs, kv)


def decoder_class(config: ModelConfig) -> type[nn.Module]:
  """The Flax module of `config.architecture`: `Llama`, or `gemma.Gemma3` (built from this
  module's blocks, so imported here on first use). Both take the same call arguments."""
  if config.architecture == "gemma3":
    from palign_jax.models.gemma import Gemma3
    return Gemma3
  return Llama


def forward(params: Params, config: ModelConfig, tokens: jax.Array,
            positions: jax.Array | None = None, *, attention_mask: jax.Array | None = None,
            kv_cache: KVCache | None = None, steering: jax.Array | None = None,
            capture_positions: jax.Array | None = None,
            logits_positions: jax.Array | None = None, vocab_subset: jax.Array | None = None,
            return_logits: bool = True, return_kv: bool = False,
            adapters: dict | None = None) -> ForwardOutput:
  """Runs the decoder on `tokens` int32[B,T] at `positions` int32[B,T] (default 0..T-1).

  attention_mask: bool[B,T], True for real tokens (padding is never attended to).
  kv_cache: earlier tokens to attend to, `[layers, Bc, S, kv_heads, head_dim]` with mask
    bool[Bc,S]; Bc is B or 1 (one prefix shared by all rows). All valid cache slots precede
    this call's tokens; `positions` must continue the cache's positions.
  steering: f32[L,N,H] or [B,L,N,H], added to every head's output at every position before
    `o_proj`. None and all-zeros give the same result.
  capture_positions: int32[B] -> `head_outputs` [B,L,N,H] at those positions (after steering).
  logits_positions: int32[B,P] -> logits only there ([B,P,V']); None -> at every position.
  vocab_subset: int32[V'] -> logits only for those token ids.
  return_logits / return_kv: Python bools (static under jit): skip the logits; return this
    call's keys/values as a `KVCache` (mask = attention_mask) to extend or reuse as a prefix.
  adapters: None, or LoRA factors `{target: {"a": [L, in, rank], "b": [L, rank, out]}}` for
    targets in ADAPTER_TARGETS, every leaf with or without a leading `[B]` axis (one adapter
    per row); see the module docstring. Zero `b` gives the same result as None.
  `config`, `return_logits`, `return_kv` must be static when this is jitted.
  """
  B, T = tokens.shape
  if adapters is not None and check_adapters(adapters, config) not in (None, B):
    raise ValueError(f"adapters: leading batch axis {check_adapters(adapters, config)} is "
                     f"neither absent nor the batch size {B}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  dtype = params["embed_tokens"]["embedding"].dtype
  return decoder_class(config)(config, dtype).apply(
      {"params": params}, tokens, positions, attention_mask, kv_cache, steering,
      capture_positions, logits_positions, vocab_subset, return_logits, return_kv, adapters)


def adapter_dims(config: ModelConfig, target: str) -> tuple[int, int]:
  """`(in, out)`: the flattened input and output sizes of an adaptable projection."""
  c = config
  dims = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim),
          "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
          "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
          "o_proj": (c.num_heads * c.head_dim, c.hidden_size)}
  if target not in dims:
    raise ValueError(f"adapter target {target!r} is not one of {ADAPTER_TARGETS}")
  return dims[target]


def check_adapters(adapters: dict, config: ModelConfig) -> int | None:
  """Raises ValueError unless `adapters` fits `config`; returns the leading batch size (None
  when the leaves have no batch axis). Shapes only, so it runs at trace time under jit."""
  leads = set()
  for target, factors in adapters.items():
    d_in, d_out = adapter_dims(config, target)
    a, b = tuple(np.shape(factors["a"])), tuple(np.shape(factors["b"]))
    rank = a[-1] if a else -1
    lead = a[:-3]
    if (len(lead) > 1 or a[-3:] != (config.num_layers, d_in, rank)
        or b != lead + (config.num_layers, rank, d_out)):
      raise ValueError(f"adapters[{target!r}]: a {a} and b {b} do not fit [batch?, layers, in, "
                       f"rank] and [batch?, layers, rank, out] with layers {config.num_layers}, "
                       f"in {d_in}, out {d_out}")
    leads.add(lead)
  if len(leads) > 1:
    raise ValueError(f"adapters: every target needs the same leading batch axis, got {leads}")
  lead = leads.pop() if leads else ()
  return lead[0] if lead else None


forward_jit = jax.jit(forward, static_argnames=("config", "return_logits", "return_kv"))
forward_jit.__doc__ = "`forward` under `jax.jit` (config and the return_* flags static)."


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters in the `params.py` layout: kernels normal(0, 0.02), norms 1, biases 0.

  Leaf by leaf, so peak memory is the parameters plus one leaf's random bits (an 8B model
  fits next to its bfloat16 weights).
  """
  model = decoder_class(config)(config, dtype)
  one = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda k: model.init(k, one, one)["params"], key)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  normal = jax.jit(lambda k, shape: 0.02 * jax.random.normal(k, shape, dtype),
                   static_argnums=1)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = path[-1].key
    if name == "scale":
      out.append(jnp.ones(leaf.shape, dtype))
    elif name == "bias":
      out.append(jnp.zeros(leaf.shape, dtype))
    else:
      out.append(normal(jax.random.fold_in(key, i), leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def param_count(params: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
