"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

A `ModelConfig` is plain, frozen, hashable data: it can be a static argument of
`jax.jit`. It is built from a Hugging Face `config.json` (`from_hf_config`) or
from GGUF metadata (see `palign_jax.models.gguf`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from palign_jax.errors import UserInputError

ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style RoPE frequency scaling ("rope_type": "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and constants of a Llama-family decoder."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False  # q/k/v biases (Qwen2)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  architecture: str = "llama"  # one of SUPPORTED_ARCHITECTURES' values
  # How attention is computed, not what: one of ATTENTION_IMPLEMENTATIONS (see
  # `llama.attention_implementation`). Not part of the model's identity: checkpoints,
  # caches and fingerprints leave it out (`loading.config_to_dict`).
  attention: str = "auto"

  @property
  def num_query_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def validate(self, source: str = "config") -> ModelConfig:
    """Raises UserInputError if the shapes are inconsistent."""
    problems = []
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        problems.append(f"{field} must be a positive integer, got {value!r}")
    if not problems and self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_attention_heads ({self.num_heads}) is not a multiple of "
          f"num_key_value_heads ({self.num_kv_heads})")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      problems.append(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                      f"{self.attention!r}")
    if problems:
      raise UserInputError(f"{source}: " + "; ".join(problems))
    return self


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config.json dictionary.

  Raises UserInputError naming `source` for unsupported architectures or
  missing fields.
  """
  architectures = hf.get("architectures") or []
  arch = next((SUPPORTED_ARCHITECTURES[a] for a in architectures
               if a in SUPPORTED_ARCHITECTURES), None)
  if arch is None:
    raise UserInputError(
        f"{source}: field 'architectures' is {architectures!r}; supported: "
        f"{sorted(SUPPORTED_ARCHITECTURES)}")

  def need(key: str) -> Any:
    if key not in hf:
      raise UserInputError(f"{source}: missing field '{key}'")
    return hf[key]

  num_heads = need("num_attention_heads")
  hidden = need("hidden_size")
  rope_scaling = None
  scaling = hf.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
      rope_scaling = RopeScaling(
          factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(
              scaling["original_max_position_embeddings"]))
    elif kind not in (None, "default"):
      raise UserInputError(
          f"{source}: field 'rope_scaling' has rope_type {kind!r}; only 'llama3' "
          "scaling is supported")
  return ModelConfig(
      vocab_size=need("vocab_size"),
      hidden_size=hidden,
      intermediate_size=need("intermediate_size"),
      num_layers=need("num_hidden_layers"),
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hidden // num_heads,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rope_scaling=rope_scaling,
      attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      architecture=arch,
  ).validate(source)
