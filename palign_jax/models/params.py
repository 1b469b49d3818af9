"""The parameter pytree of a Llama-family model, and conversion from HF tensors.

Every loader (Hugging Face safetensors, GGUF) produces a flat mapping of
Hugging Face tensor names to numpy arrays in Hugging Face orientation
(`nn.Linear.weight` is `[out, in]`); `params_from_hf_tensors` turns it into
the pytree the Flax model consumes. Layers are stacked on a leading axis so
the model can `scan` over them:

    embed_tokens.embedding        [vocab, hidden]
    layers.input_layernorm.scale  [layers, hidden]
    layers.attn.q_proj.kernel     [layers, hidden, heads, head_dim]
    layers.attn.q_proj.bias       [layers, heads, head_dim]          (Qwen2 only)
    layers.attn.k_proj.kernel     [layers, hidden, kv_heads, head_dim]
    layers.attn.k_proj.bias       [layers, kv_heads, head_dim]       (Qwen2 only)
    layers.attn.v_proj.kernel     [layers, hidden, kv_heads, head_dim]
    layers.attn.v_proj.bias       [layers, kv_heads, head_dim]       (Qwen2 only)
    layers.attn.o_proj.kernel     [layers, heads, head_dim, hidden]
    layers.post_attention_layernorm.scale [layers, hidden]
    layers.mlp.gate_proj.kernel   [layers, hidden, intermediate]
    layers.mlp.up_proj.kernel     [layers, hidden, intermediate]
    layers.mlp.down_proj.kernel   [layers, intermediate, hidden]
    norm.scale                    [hidden]
    lm_head.kernel                [hidden, vocab]                    (untied only)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, Any],
                           dtype=np.float32, source: str = "checkpoint") -> Params:
  """Converts HF-named tensors (HF orientation) into the stacked pytree above."""
  check_hf_tensors(config, tensors, source)
  c = config

  def get(name: str) -> np.ndarray:
    return np.asarray(tensors[name], dtype=np.float32)

  def stack(suffix: str, transform) -> np.ndarray:
    return np.stack([transform(get(f"model.layers.{i}.{suffix}"))
                     for i in range(c.num_layers)]).astype(dtype)

  def in_heads(n_heads):
    # [n_heads*head_dim, hidden] -> [hidden, n_heads, head_dim]
    return lambda w: w.T.reshape(c.hidden_size, n_heads, c.head_dim)

  attn = {
      "q_proj": {"kernel": stack("self_attn.q_proj.weight", in_heads(c.num_heads))},
      "k_proj": {"kernel": stack("self_attn.k_proj.weight", in_heads(c.num_kv_heads))},
      "v_proj": {"kernel": stack("self_attn.v_proj.weight", in_heads(c.num_kv_heads))},
      "o_proj": {"kernel": stack(
          "self_attn.o_proj.weight",
          lambda w: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size))},
  }
  if c.attention_bias:
    for name, n_heads in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads),
                          ("v_proj", c.num_kv_heads)):
      attn[name]["bias"] = stack(f"self_attn.{name}.bias",
                                 lambda b, n=n_heads: b.reshape(n, c.head_dim))
  params: Params = {
      "embed_tokens": {"embedding": get("model.embed_tokens.weight").astype(dtype)},
      "layers": {
          "input_layernorm": {"scale": stack("input_layernorm.weight", lambda w: w)},
          "attn": attn,
          "post_attention_layernorm": {
              "scale": stack("post_attention_layernorm.weight", lambda w: w)},
          "mlp": {
              "gate_proj": {"kernel": stack("mlp.gate_proj.weight", lambda w: w.T)},
              "up_proj": {"kernel": stack("mlp.up_proj.weight", lambda w: w.T)},
              "down_proj": {"kernel": stack("mlp.down_proj.weight", lambda w: w.T)},
          },
      },
      "norm": {"scale": get("model.norm.weight").astype(dtype)},
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T.astype(dtype)}
  return params
