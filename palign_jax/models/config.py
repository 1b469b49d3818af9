"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) and Gemma 3.

A `ModelConfig` is plain, frozen, hashable data: it can be a static argument of
`jax.jit`. It is built from a Hugging Face `config.json` (`from_hf_config`) or
from GGUF metadata (see `palign_jax.models.gguf`). Gemma 3's own constants (sliding-window
layers, their RoPE base, the query scale, soft-capping, GeGLU) are fields with defaults that
mean "not used", so a Llama-family config is what it always was (`GEMMA_FIELDS`).
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
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # 4B-27B: the text decoder alone is read
}
# transformers' Gemma3TextConfig defaults for the fields an image-text checkpoint's sparse
# `text_config` leaves out (the 4B one gives only sizes, layer count, window and RoPE scaling).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256,
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU (Llama family), GeGLU (Gemma)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style RoPE frequency scaling ("rope_type": "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


# Fields added for Gemma 3. Left out of a model's identity while at their defaults, so the
# fingerprints and cache keys of Llama-family models did not change (`loading.config_to_dict`).
GEMMA_FIELDS = ("hidden_activation", "sliding_window", "sliding_window_pattern",
                "rope_local_theta", "rope_linear_factor", "query_pre_attn_scalar",
                "final_logit_softcapping")


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
  # Gemma 3 (`models/gemma.py`); the defaults are the Llama family's "not used".
  hidden_activation: str = "silu"  # one of ACTIVATIONS: the gate's activation in the MLP
  sliding_window: int | None = None  # local layers see keys fewer than this many positions back
  sliding_window_pattern: int = 0  # layer i is global iff (i + 1) % pattern == 0; 0: all global
  rope_local_theta: float | None = None  # RoPE base of the local (sliding-window) layers
  rope_linear_factor: float = 1.0  # global layers' positions divided by this (linear scaling)
  query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None: head_dim
  final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

  @property
  def num_query_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend through the sliding window (a local layer)?"""
    if self.sliding_window is None or not self.sliding_window_pattern:
      return (False,) * self.num_layers
    return tuple(bool((i + 1) % self.sliding_window_pattern) for i in range(self.num_layers))

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
    if self.hidden_activation not in ACTIVATIONS:
      problems.append(f"hidden_activation must be one of {ACTIVATIONS}, got "
                      f"{self.hidden_activation!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      problems.append(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
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
  if "Gemma3ForConditionalGeneration" in architectures:
    hf = gemma3_text_config(hf, source)
    architectures = hf["architectures"]
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
  if arch == "gemma3":
    return _from_gemma3_config(hf, need, source)
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


def gemma3_text_config(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The text decoder's config of a `Gemma3ForConditionalGeneration` (image-text) config.json:
  its `text_config` over transformers' defaults, as a `Gemma3ForCausalLM` config."""
  text = hf.get("text_config")
  if not isinstance(text, Mapping):
    raise UserInputError(f"{source}: a Gemma3ForConditionalGeneration config needs an object "
                         f"'text_config', got {text!r}")
  merged = {**GEMMA3_TEXT_DEFAULTS, **text, "architectures": ["Gemma3ForCausalLM"]}
  if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
    merged["tie_word_embeddings"] = hf["tie_word_embeddings"]
  return merged


def _layer_pattern(layer_types: list[str], source: str) -> int:
  """The `sliding_window_pattern` whose layers are `layer_types`; UserInputError if none is."""
  kinds = {"sliding_attention": True, "full_attention": False}
  if not isinstance(layer_types, list) or any(t not in kinds for t in layer_types):
    raise UserInputError(f"{source}: field 'layer_types' is {layer_types!r}; expected a list of "
                         f"{sorted(kinds)}")
  local = [kinds[t] for t in layer_types]
  if all(local) or not any(local):
    return 0 if not any(local) else len(local) + 1
  pattern = local.index(False) + 1
  if local != [bool((i + 1) % pattern) for i in range(len(local))]:
    raise UserInputError(f"{source}: field 'layer_types' does not repeat one global layer every "
                         "N layers; only such patterns are supported")
  return pattern


def _from_gemma3_config(hf: Mapping[str, Any], need, source: str) -> ModelConfig:
  """A Gemma 3 text config (`Gemma3ForCausalLM`), with transformers' defaults for what it omits.

  RoPE: `rope_theta` / `rope_local_base_freq` / `rope_scaling` (older files) or
  `rope_parameters` per layer kind (transformers >= 5); only linear scaling of the global
  layers (the 4B-27B models) is supported. `attn_logit_softcapping` is not read: transformers'
  Gemma 3 reads it into its config but never applies it (Gemma 2 did), nor does this model.
  """
  if hf.get("use_bidirectional_attention"):
    raise UserInputError(f"{source}: 'use_bidirectional_attention' is true (an embedding "
                         "model); only causal Gemma 3 decoders are supported")
  rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
  full = dict(rope.get("full_attention") or {})
  local = dict(rope.get("sliding_attention") or {})
  full.update(hf.get("rope_scaling") or {})
  theta = float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
  local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
  kind = full.get("rope_type", full.get("type", "default"))
  if kind not in ("default", "linear") or local.get("rope_type", "default") != "default":
    raise UserInputError(f"{source}: Gemma 3 RoPE scaling {kind!r} is not supported (only "
                         "'linear' on the global layers)")
  num_heads, hidden, layers = need("num_attention_heads"), need("hidden_size"), need(
      "num_hidden_layers")
  if hf.get("layer_types") is not None:
    pattern = _layer_pattern(hf["layer_types"], source)
  else:
    pattern = int(hf.get("sliding_window_pattern", 6))
  window = hf.get("sliding_window", 4096)
  return ModelConfig(
      vocab_size=need("vocab_size"),
      hidden_size=hidden,
      intermediate_size=need("intermediate_size"),
      num_layers=layers,
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hidden // num_heads,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      attention_bias=bool(hf.get("attention_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
      architecture="gemma3",
      hidden_activation=hf.get("hidden_activation") or "gelu_pytorch_tanh",
      sliding_window=None if window is None else int(window),
      sliding_window_pattern=pattern,
      rope_local_theta=local_theta,
      rope_linear_factor=float(full.get("factor", 1.0)) if kind == "linear" else 1.0,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      final_logit_softcapping=_optional_float(hf.get("final_logit_softcapping")),
  ).validate(source)


def _optional_float(value: Any) -> float | None:
  return None if value is None else float(value)
