"""The parameter pytree of a Llama-family or Gemma 3 model, and conversion from HF tensors.

Every loader (Hugging Face safetensors, GGUF) produces a flat mapping of
Hugging Face tensor names to numpy arrays in Hugging Face orientation
(`nn.Linear.weight` is `[out, in]`); `params_from_hf_tensors` turns it into
the pytree the Flax model consumes. Layers are stacked on a leading axis so
the model can `scan` over them:

    embed_tokens.embedding          [vocab, hidden]
    layers.input_layernorm.scale    [layers, hidden]
    layers.attn.qkv_proj.kernel     [layers, hidden, kv_heads, groups + 2, head_dim]
    layers.attn.qkv_proj.bias       [layers, kv_heads, groups + 2, head_dim]   (Qwen2 only)
    layers.attn.o_proj.kernel       [layers, heads, head_dim, hidden]
    layers.post_attention_layernorm.scale [layers, hidden]
    layers.mlp.gate_up_proj.kernel  [layers, hidden, 2, intermediate]   (gate, then up)
    layers.mlp.down_proj.kernel     [layers, intermediate, hidden]
    norm.scale                      [hidden]
    lm_head.kernel                  [hidden, vocab]                     (untied only)

Gemma 3 adds, and reads `post_attention_layernorm` as the norm of the attention's output:

    layers.attn.q_norm.scale        [layers, head_dim]
    layers.attn.k_norm.scale        [layers, head_dim]
    layers.pre_feedforward_layernorm.scale  [layers, hidden]
    layers.post_feedforward_layernorm.scale [layers, hidden]

Every `scale` is the multiplier itself: Gemma checkpoints store `scale - 1` (their RMSNorm
multiplies by `1 + weight`), so 1 is added, in float32, at conversion.

q, k and v are stored fused, grouped by key/value head: slot `g < groups` of kv head `k` is
query head `k * groups + g` (the head that reads kv head `k` in grouped-query attention), slot
`groups` is the key and `groups + 1` the value (`groups = heads // kv_heads`). One matmul
computes all three, and splitting the `kv_heads` axis over devices (tensor parallelism) gives
each device whole groups, so no layer reshards. gate and up are fused the same way on a
separate axis of size 2, so splitting `intermediate` keeps each device's gate and up units
together. `fuse_qkv` / `split_qkv` convert between this and per-projection arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig

Params = dict[str, Any]


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor names and shapes a checkpoint of `config` must hold."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = {
      "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
      "model.norm.weight": (c.hidden_size,),
  }
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (c.hidden_size,),
        p + "post_attention_layernorm.weight": (c.hidden_size,),
        p + "self_attn.q_proj.weight": (q_out, c.hidden_size),
        p + "self_attn.k_proj.weight": (kv_out, c.hidden_size),
        p + "self_attn.v_proj.weight": (kv_out, c.hidden_size),
        p + "self_attn.o_proj.weight": (c.hidden_size, q_out),
        p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    })
    if c.architecture == "gemma3":
      shapes.update({
          p + "self_attn.q_norm.weight": (c.head_dim,),
          p + "self_attn.k_norm.weight": (c.head_dim,),
          p + "pre_feedforward_layernorm.weight": (c.hidden_size,),
          p + "post_feedforward_layernorm.weight": (c.hidden_size,),
      })
    if c.attention_bias:
      shapes.update({
          p + "self_attn.q_proj.bias": (q_out,),
          p + "self_attn.k_proj.bias": (kv_out,),
          p + "self_attn.v_proj.bias": (kv_out,),
      })
  return shapes


def check_hf_tensors(config: ModelConfig, tensors: Mapping[str, Any],
                     source: str) -> None:
  """Raises UserInputError naming `source` for missing or mis-shaped tensors."""
  for name, shape in expected_hf_shapes(config).items():
    if name not in tensors:
      raise UserInputError(f"{source}: tensor '{name}' is missing")
    got = tuple(tensors[name].shape)
    if got != shape:
      raise UserInputError(
          f"{source}: tensor '{name}' has shape {got}, but the config implies {shape}")


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every leaf's path and shape in the layout above (the planner prices memory from it)."""
  c = config
  L, D, K, H = c.num_layers, c.hidden_size, c.num_kv_heads, c.head_dim
  slots = c.num_query_groups + 2
  shapes = {
      ("embed_tokens", "embedding"): (c.vocab_size, D),
      ("layers", "input_layernorm", "scale"): (L, D),
      ("layers", "attn", "qkv_proj", "kernel"): (L, D, K, slots, H),
      ("layers", "attn", "o_proj", "kernel"): (L, c.num_heads, H, D),
      ("layers", "post_attention_layernorm", "scale"): (L, D),
      ("layers", "mlp", "gate_up_proj", "kernel"): (L, D, 2, c.intermediate_size),
      ("layers", "mlp", "down_proj", "kernel"): (L, c.intermediate_size, D),
      ("norm", "scale"): (D,),
  }
  if c.attention_bias:
    shapes[("layers", "attn", "qkv_proj", "bias")] = (L, K, slots, H)
  if c.architecture == "gemma3":
    shapes.update({
        ("layers", "attn", "q_norm", "scale"): (L, H),
        ("layers", "attn", "k_norm", "scale"): (L, H),
        ("layers", "pre_feedforward_layernorm", "scale"): (L, D),
        ("layers", "post_feedforward_layernorm", "scale"): (L, D),
    })
  if not c.tie_word_embeddings:
    shapes[("lm_head", "kernel")] = (D, c.vocab_size)
  return shapes


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """q [..., heads, head_dim], k and v [..., kv_heads, head_dim] -> the fused
  [..., kv_heads, groups + 2, head_dim] (any leading axes, numpy or jax arrays)."""
  *lead, n, h = q.shape
  kv = k.shape[-2]
  xp = np if isinstance(q, np.ndarray) else jnp
  grouped = q.reshape(*lead, kv, n // kv, h)
  return xp.concatenate([grouped, k[..., None, :], v[..., None, :]], axis=-2)


def split_qkv(qkv):
  """Inverse of `fuse_qkv`: [..., kv_heads, groups + 2, head_dim] -> (q [..., heads,
  head_dim], k [..., kv_heads, head_dim], v [..., kv_heads, head_dim])."""
  *lead, kv, slots, h = qkv.shape
  groups = slots - 2
  q = qkv[..., :groups, :].reshape(*lead, kv * groups, h)
  return q, qkv[..., groups, :], qkv[..., groups + 1, :]


def params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, Any],
                           dtype=np.float32, source: str = "checkpoint") -> Params:
  """Converts HF-named tensors (HF orientation) into the stacked pytree above."""
  check_hf_tensors(config, tensors, source)
  c = config
  gemma = c.architecture == "gemma3"

  def get(name: str) -> np.ndarray:
    value = np.asarray(tensors[name], dtype=np.float32)
    if gemma and name.endswith("norm.weight"):  # Gemma's RMSNorm multiplies by 1 + weight
      value = np.float32(1.0) + value
    return value

  def stack(suffix: str, transform) -> np.ndarray:
    return np.stack([transform(get(f"model.layers.{i}.{suffix}"))
                     for i in range(c.num_layers)]).astype(dtype)

  def fused(kind: str, transform) -> np.ndarray:
    return np.stack([fuse_qkv(*(transform(get(f"model.layers.{i}.self_attn.{p}.{kind}"), n)
                                for p, n in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads),
                                             ("v_proj", c.num_kv_heads))))
                     for i in range(c.num_layers)]).astype(dtype)

  attn = {
      # [n_heads*head_dim, hidden] -> [hidden, n_heads, head_dim], fused per layer
      "qkv_proj": {"kernel": fused("weight", lambda w, n: w.T.reshape(c.hidden_size, n,
                                                                       c.head_dim))},
      "o_proj": {"kernel": stack(
          "self_attn.o_proj.weight",
          lambda w: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size))},
  }
  if c.attention_bias:
    attn["qkv_proj"]["bias"] = fused("bias", lambda b, n: b.reshape(n, c.head_dim))
  params: Params = {
      "embed_tokens": {"embedding": get("model.embed_tokens.weight").astype(dtype)},
      "layers": {
          "input_layernorm": {"scale": stack("input_layernorm.weight", lambda w: w)},
          "attn": attn,
          "post_attention_layernorm": {
              "scale": stack("post_attention_layernorm.weight", lambda w: w)},
          "mlp": {
              "gate_up_proj": {"kernel": np.stack([
                  np.stack([get(f"model.layers.{i}.mlp.{p}_proj.weight").T
                            for p in ("gate", "up")], axis=1)
                  for i in range(c.num_layers)]).astype(dtype)},
              "down_proj": {"kernel": stack("mlp.down_proj.weight", lambda w: w.T)},
          },
      },
      "norm": {"scale": get("model.norm.weight").astype(dtype)},
  }
  if gemma:
    layers = params["layers"]
    for name in ("q_norm", "k_norm"):
      attn[name] = {"scale": stack(f"self_attn.{name}.weight", lambda w: w)}
    for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
      layers[name] = {"scale": stack(f"{name}.weight", lambda w: w)}
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T.astype(dtype)}
  return params
