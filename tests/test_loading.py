"""`load_model`: spec resolution, the orbax params cache, fingerprints, end-to-end parity.

End-to-end parity: a tiny random transformers Llama is saved as an HF folder and as a GGUF
file (q/k permuted as llama.cpp does); both load paths through our Flax forward must give
transformers' logits (max |diff| <= 1e-5 * max |logits|). The slow test does the same for
the real SmolLM2 GGUF: our loader + Flax forward against transformers' LlamaForCausalLM
(float32, eager attention) holding the same dequantized weights, on a chat-formatted prompt.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from palign_jax.errors import UserInputError
from palign_jax.models import gguf as gguf_loader
from palign_jax.models import loading
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import forward_jit
from palign_jax.models.tokenizer import chat_prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
VOCAB = SPECIALS + BYTES + ["Ġt"]  # a byte-level vocabulary with one merge
TINY = ModelConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=128)


def torch_model(config: ModelConfig, seed=0):
  torch.manual_seed(seed)
  hf = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      tie_word_embeddings=config.tie_word_embeddings,
      max_position_embeddings=config.max_position_embeddings)
  model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="eager")
  with torch.no_grad():
    for name, value in model.named_parameters():
      if name.endswith("norm.weight"):
        value.copy_(1 + 0.1 * torch.randn_like(value))
  return model.eval()


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def our_logits(loaded, tokens):
  out = forward_jit(loaded.params, loaded.config, jnp.asarray(tokens, jnp.int32))
  return np.asarray(out.logits)


def assert_logits_close(ours, reference, rtol=1e-5):
  scale = np.abs(reference).max()
  np.testing.assert_allclose(ours, reference, rtol=0, atol=rtol * scale + 1e-6)


def save_folder(folder, model):
  model.save_pretrained(folder)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")),
      unk_token="[UNK]", chat_template=CHATML)
  tokenizer.save_pretrained(folder)
  return folder


def save_gguf(path, model, config, chat_template=CHATML):
  tensors = {k: v.numpy() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
  metadata = {
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.tokens": VOCAB, "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(VOCAB) - 3),
      "tokenizer.ggml.merges": ["Ġ t"], "tokenizer.ggml.eos_token_id": 2,
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": False,
      **({"tokenizer.chat_template": chat_template} if chat_template else {})}
  gguf_loader.write_gguf(path, config, tensors, metadata=metadata)
  return path


TOKENS = [[5, 17, 3, 200, 41, 9, 77, 120], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def tiny_model():
  return torch_model(TINY)


def test_hf_folder_matches_torch_and_is_cached(tmp_path, tiny_model):
  folder = save_folder(tmp_path / "model", tiny_model)
  cache = tmp_path / "cache"
  first = loading.load_model(folder, cache_dir=cache)
  assert not first.from_cache and first.source == str(folder)
  assert first.config == TINY
  reference = torch_logits(tiny_model, TOKENS)
  assert_logits_close(our_logits(first, TOKENS), reference)

  second = loading.load_model(folder, cache_dir=cache)
  assert second.from_cache
  assert second.fingerprint == first.fingerprint and second.config == first.config
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
    assert isinstance(b, jax.Array) and b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(first.params) == jax.tree.structure(second.params)
  assert second.tokenizer("hello")["input_ids"] == [1]
  assert chat_prompt(second.tokenizer, [{"role": "user", "content": "hi"}]).startswith(
      "<|im_start|>user\nhi")


def test_gguf_matches_torch_and_cache_keeps_tokenizer(tmp_path, tiny_model):
  """q/k are permuted on writing; only a correct un-permutation reproduces torch's logits."""
  path = save_gguf(tmp_path / "tiny.gguf", tiny_model, TINY)
  cache = tmp_path / "cache"
  first = loading.load_model(path, cache_dir=cache)
  assert_logits_close(our_logits(first, TOKENS), torch_logits(tiny_model, TOKENS))
  second = loading.load_model(path, cache_dir=cache)
  assert second.from_cache and second.fingerprint == first.fingerprint
  assert second.config == first.config
  text = "<|im_start|>user\nthe 42 tests<|im_end|>\n"
  assert second.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]
  assert second.tokenizer.eos_token == "<|im_end|>" and second.tokenizer.name_or_path == str(path)
  messages = [{"role": "user", "content": "hi"}]
  assert chat_prompt(second.tokenizer, messages) == chat_prompt(first.tokenizer, messages)


def test_dtype_and_use_cache(tmp_path, tiny_model):
  folder = save_folder(tmp_path / "model", tiny_model)
  cache = tmp_path / "cache"
  f32 = loading.load_model(folder, cache_dir=cache, use_cache=False)
  assert not (cache / "models").exists()
  bf16 = loading.load_model(folder, "bfloat16", cache_dir=cache)
  again = loading.load_model(folder, jnp.bfloat16, cache_dir=cache)
  assert again.from_cache and bf16.fingerprint == f32.fingerprint
  for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(again.params), strict=True):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
  with pytest.raises(UserInputError, match="dtype: 'int8' is not supported"):
    loading.load_model(folder, "int8", cache_dir=cache)


def test_fingerprint_follows_weights_not_location(tmp_path, tiny_model):
  folder = save_folder(tmp_path / "a", tiny_model)
  base = loading.load_model(folder, cache_dir=tmp_path / "cache").fingerprint
  assert len(base) == 16
  copy = shutil.copytree(folder, tmp_path / "b")
  moved = loading.load_model(copy, cache_dir=tmp_path / "cache")
  assert moved.fingerprint == base and moved.from_cache
  other = save_folder(tmp_path / "c", torch_model(TINY, seed=1))
  assert loading.load_model(other, cache_dir=tmp_path / "cache").fingerprint != base
  # A different config over the same weight files is a different model.
  config = json.loads((copy / "config.json").read_text())
  config["rms_norm_eps"] = 1e-3
  (copy / "config.json").write_text(json.dumps(config))
  assert loading.load_model(copy, cache_dir=tmp_path / "cache").fingerprint != base


def test_broken_cache_entry_is_rebuilt(tmp_path, tiny_model):
  folder = save_folder(tmp_path / "model", tiny_model)
  cache = tmp_path / "cache"
  first = loading.load_model(folder, cache_dir=cache)
  (entry,) = (cache / "models").iterdir()
  shutil.rmtree(entry / "params")
  with pytest.warns(UserWarning, match="unreadable cache entry"):
    rebuilt = loading.load_model(folder, cache_dir=cache)
  assert not rebuilt.from_cache and rebuilt.fingerprint == first.fingerprint
  assert loading.load_model(folder, cache_dir=cache).from_cache


def test_a_sharded_restore_that_fails_says_so_and_keeps_the_entry(tmp_path, tiny_model):
  from palign_jax import parallel

  folder = save_folder(tmp_path / "model", tiny_model)
  cache = tmp_path / "cache"
  loading.load_model(folder, cache_dir=cache)
  (entry,) = (cache / "models").iterdir()
  mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
  good = lambda shapes: parallel.param_shardings(shapes, mesh)
  assert loading.load_model(folder, cache_dir=cache, shardings=good).from_cache

  def failing(shapes):  # what a device out of memory or a mesh it cannot hold looks like
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  with pytest.raises(UserInputError, match=r"could not be restored into this mesh's shardings "
                     r"\(RuntimeError: RESOURCE_EXHAUSTED.*The entry is kept"):
    loading.load_model(folder, cache_dir=cache, shardings=failing)
  assert (entry / "params").is_dir()  # nothing deleted, nothing converted
  # A broken entry is another matter: rebuilt with a warning, sharded or not.
  shutil.rmtree(entry / "params")
  with pytest.warns(UserWarning, match="unreadable cache entry"):
    assert not loading.load_model(folder, cache_dir=cache, shardings=good).from_cache


def test_folder_without_tokenizer(tmp_path, tiny_model):
  tiny_model.save_pretrained(tmp_path / "bare")
  with pytest.raises(UserInputError, match=r"bare: no tokenizer in this folder"):
    loading.load_model(tmp_path / "bare", cache_dir=tmp_path / "cache")


def test_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "elsewhere"))
  assert loading.default_cache_dir() == tmp_path / "elsewhere"
  monkeypatch.delenv(loading.CACHE_ENV)
  assert loading.default_cache_dir().parts[-2:] == (".cache", "palign_jax")


def test_resolve_spec(tmp_path):
  default = gguf_loader.default_gguf_path()
  for spec in (None, "default", "smollm2", "SmolLM2"):
    assert loading.resolve_spec(spec) == ("gguf", default)
  assert loading.resolve_spec(tmp_path) == ("hf", tmp_path)
  with pytest.raises(UserInputError, match=r"missing\.gguf: GGUF file not found"):
    loading.resolve_spec(tmp_path / "missing.gguf")
  (tmp_path / "weights.bin").write_bytes(b"x")
  with pytest.raises(UserInputError, match=r"weights\.bin: not a \.gguf file"):
    loading.resolve_spec(tmp_path / "weights.bin")
  with pytest.raises(UserInputError, match=r"meta-llama/Llama-3-8B: no such file or folder.*"
                     "never downloaded"):
    loading.resolve_spec("meta-llama/Llama-3-8B")


def test_bad_inputs_are_user_errors(tmp_path, tiny_model):
  cache = tmp_path / "cache"
  path = save_gguf(tmp_path / "cut.gguf", tiny_model, TINY)
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(UserInputError, match=r"cut\.gguf: not a readable GGUF file"):
    loading.load_model(path, cache_dir=cache)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserInputError, match=r"empty/config\.json: config\.json not found"):
    loading.load_model(tmp_path / "empty", cache_dir=cache)
  no_template = save_gguf(tmp_path / "plain.gguf", tiny_model, TINY, chat_template=None)
  for _ in range(2):  # fresh, then from the cache: the message still names the GGUF file
    loaded = loading.load_model(no_template, cache_dir=cache)
    with pytest.raises(UserInputError, match=r"plain\.gguf: the tokenizer has no chat template"):
      chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hi"}])
  assert loaded.from_cache


@pytest.mark.slow
def test_smollm2_logits_match_transformers(tmp_path):
  """Real SmolLM2 (Q4_1 GGUF): our loader + Flax forward vs transformers on the same weights.

  Tolerance: max |ours - torch| <= 2e-5 * max |logits| (float32, 30 layers); observed
  1.1e-4 absolute with max |logits| 38.7, i.e. 3e-6 relative.
  """
  loaded = loading.load_model("default", cache_dir=tmp_path / "cache")
  config = loaded.config
  _, tensors = gguf_loader.read_gguf(loaded.source)
  model = torch_model(config)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  prompt = chat_prompt(loaded.tokenizer, [
      {"role": "system", "content": "You are answering a personality questionnaire."},
      {"role": "user", "content": "Statement: I am the life of the party.\n"
                                  "Answer with a number from 1 (disagree) to 5 (agree)."}])
  tokens = [loaded.tokenizer(prompt)["input_ids"]]
  assert len(tokens[0]) > 30
  reference = torch_logits(model, tokens)
  ours = our_logits(loaded, tokens)
  assert_logits_close(ours, reference, rtol=2e-5)
  assert (ours.argmax(-1) == reference.argmax(-1)).mean() > 0.97
  print(f"SmolLM2 max |ours - torch| = {np.abs(ours - reference).max():.2e}, "
        f"max |logits| = {np.abs(reference).max():.1f}")

  cached = loading.load_model("default", cache_dir=tmp_path / "cache")
  assert cached.from_cache and cached.fingerprint == loaded.fingerprint
  assert_logits_close(our_logits(cached, tokens), ours, rtol=0)
