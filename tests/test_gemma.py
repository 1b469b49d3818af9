"""Parity of the Flax Gemma 3 decoder with transformers' PyTorch `Gemma3ForCausalLM`.

Tiny random-weight models, float32, eager attention. Windows of 5-6 positions and sequences of
20-24 tokens, so most queries of a local layer see fewer keys than a global one, also across
a KV prefix cache (shared by all rows, padded, or per row). Tolerance as in `test_llama.py`:
max |ours - torch| <= 1e-5 * max |torch| (+1e-6 absolute).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_llama import assert_close, o_proj_bias, random_tokens, torch_head_outputs  # noqa: E402

from palign_jax import parallel  # noqa: E402
from palign_jax.errors import UserInputError  # noqa: E402
from palign_jax.models import config as config_lib  # noqa: E402
from palign_jax.models.gemma import cache_positions, window_masks  # noqa: E402
from palign_jax.models.llama import KVCache, init_params  # noqa: E402
from palign_jax.models.llama import forward_jit as forward  # noqa: E402
from palign_jax.models.params import param_shapes, params_from_hf_tensors  # noqa: E402

# name -> transformers Gemma3TextConfig arguments. "gqa": 2 local layers then a global one,
# a query scale that is not head_dim's; "mqa_softcap": one kv head (as the 270M model),
# alternating layers, soft-capped logits, linear RoPE scaling on global layers (and an
# attention soft-cap, which transformers' Gemma 3 reads but does not apply; neither do we).
VARIANTS = {
    "gqa": dict(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                                       "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "mqa_softcap": dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=5, sliding_window_pattern=2, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, rms_norm_eps=1e-5,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@functools.cache
def build(name: str):
  """A random torch Gemma 3 (eager attention), our config read from its config.json form, and
  the same weights as our params pytree."""
  hf = transformers.Gemma3TextConfig(max_position_embeddings=512, tie_word_embeddings=True,
                                     **VARIANTS[name])
  torch.manual_seed(sum(map(ord, name)))
  model = transformers.Gemma3ForCausalLM._from_config(hf, attn_implementation="eager")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):  # Gemma stores the multiplier minus 1
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1)
  model.eval()
  config = config_lib.from_hf_config({**hf.to_dict(), "architectures": ["Gemma3ForCausalLM"]})
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, config, params_from_hf_tensors(config, tensors)


def torch_logits(model, tokens, position_ids=None):
  with torch.no_grad():
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    pos = None if position_ids is None else torch.from_numpy(np.asarray(position_ids, np.int64))
    return model(input_ids=ids, position_ids=pos).logits.numpy()


def test_config_reads_the_gemma_fields():
  _, config, _ = build("gqa")
  assert config.architecture == "gemma3" and config.hidden_activation == "gelu_pytorch_tanh"
  assert config.sliding_layers() == (True, True, False, True)
  assert (config.sliding_window, config.rope_theta, config.rope_local_theta) == (6, 1e6, 1e4)
  assert config.query_pre_attn_scalar == 24 and config.tie_word_embeddings
  _, capped, _ = build("mqa_softcap")
  assert capped.sliding_layers() == (True, False, True)
  assert (capped.rope_linear_factor, capped.final_logit_softcapping) == (4.0, 4.0)
  with pytest.raises(UserInputError, match="every N layers"):
    config_lib.from_hf_config({**transformers.Gemma3TextConfig(**VARIANTS["gqa"]).to_dict(),
                               "architectures": ["Gemma3ForCausalLM"],
                               "layer_types": ["full_attention", "sliding_attention"] * 2})


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers_across_the_window(name):
  model, config, params = build(name)
  tokens = random_tokens(config, (2, 24))
  positions = np.broadcast_to(np.arange(24) + 100, (2, 24)).astype(np.int32)
  for pos in (None, positions):
    ours = forward(params, config, jnp.asarray(tokens),
                   None if pos is None else jnp.asarray(pos)).logits
    assert_close(ours, torch_logits(model, tokens, pos))
  # The window matters: without it (every layer global) the late logits differ.
  wide = dataclasses.replace(config, sliding_window=10_000)
  late = np.asarray(forward(params, wide, jnp.asarray(tokens)).logits)[:, 12:]
  assert np.abs(late - torch_logits(model, tokens)[:, 12:]).max() > 1e-3


def test_head_outputs_equal_o_proj_input():
  model, config, params = build("gqa")
  tokens = random_tokens(config, (3, 20), seed=1)
  capture = np.array([19, 4, 11], np.int32)
  ref = torch_head_outputs(model, tokens)[np.arange(3), :, capture]
  ref = ref.reshape(3, config.num_layers, config.num_heads, config.head_dim)
  out = forward(params, config, jnp.asarray(tokens), capture_positions=jnp.asarray(capture))
  assert out.head_outputs.shape == (3, config.num_layers, config.num_heads, config.head_dim)
  assert_close(out.head_outputs, ref)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_steering_equals_o_proj_bias(name):
  model, config, params = build(name)
  tokens = random_tokens(config, (2, 16), seed=2)
  delta = np.random.default_rng(3).normal(
      0, 0.3, (config.num_layers, config.num_heads, config.head_dim)).astype(np.float32)
  with o_proj_bias(model, delta):
    ref = torch_logits(model, tokens)
  steered = forward(params, config, jnp.asarray(tokens), steering=jnp.asarray(delta)).logits
  plain = forward(params, config, jnp.asarray(tokens)).logits
  assert_close(steered, ref)
  assert np.abs(np.asarray(steered) - np.asarray(plain)).max() > 1e-3
  zero = forward(params, config, jnp.asarray(tokens), steering=jnp.zeros_like(delta)).logits
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_prefix_cache_past_the_window_matches_full_forward(attention):
  """Prefix-shared scoring's pattern: a cached prefix longer than the window, continued by
  rows whose queries' windows start inside it; shared (batch 1, padded) and per-row caches."""
  model, config, params = build("gqa")
  config = dataclasses.replace(config, attention=attention)
  tokens = random_tokens(config, (2, 24), seed=6)
  ref = torch_logits(model, tokens)
  full = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
  first = forward(params, config, full[:, :14], positions[:, :14], return_kv=True)
  second = forward(params, config, full[:, 14:], positions[:, 14:], kv_cache=first.kv_cache)
  assert_close(second.logits, ref[:, 14:])
  # One prefix for every row, with 3 padded slots after it (as `scoring.encode_prefixes`).
  prefix = forward(params, config, full[:1, :14], positions[:1, :14], return_kv=True).kv_cache
  pad = lambda x: jnp.concatenate([x, jnp.full_like(x[:, :, :3], 7.0)], axis=2)
  padded = KVCache(pad(prefix.keys), pad(prefix.values),
                   jnp.concatenate([prefix.mask, jnp.zeros((1, 3), bool)], axis=1))
  tails = jnp.stack([full[0, 14:], full[1, 14:]])
  shared = forward(params, config, tails, positions[:, 14:], kv_cache=padded,
                   logits_positions=jnp.asarray([[9], [4]])).logits
  ref_rows = torch_logits(model, np.concatenate(
      [np.repeat(tokens[:1, :14], 2, 0), np.asarray(tails)], axis=1))
  assert_close(shared, np.stack([ref_rows[0, [23]], ref_rows[1, [18]]]))


def test_right_padded_prefix_then_questions_as_scoring_does():
  """Prefixes of different lengths right-padded in one cache, each continued at its own
  positions: the padded slots shift no position (the window counts real tokens)."""
  model, config, params = build("gqa")
  tokens = random_tokens(config, (2, 22), seed=8)
  lengths = np.array([15, 9])
  mask = jnp.arange(15)[None] < jnp.asarray(lengths)[:, None]
  prefix = jnp.asarray(np.where(np.asarray(mask), tokens[:, :15], 0))
  cache = forward(params, config, prefix, attention_mask=mask, return_kv=True).kv_cache
  np.testing.assert_array_equal(np.asarray(cache_positions(cache.mask))[1, :9], np.arange(9))
  for row, n in enumerate(lengths):
    tail = jnp.asarray(tokens[row:row + 1, 15:])
    one = KVCache(cache.keys[:, row:row + 1], cache.values[:, row:row + 1],
                  cache.mask[row:row + 1])
    out = forward(params, config, tail, n + jnp.arange(7, dtype=jnp.int32)[None], kv_cache=one)
    ref = torch_logits(model, np.concatenate([tokens[row:row + 1, :n], tokens[row:row + 1, 15:]],
                                             axis=1))
    assert_close(out.logits, ref[:, n:])


def test_window_masks_count_positions():
  positions = jnp.asarray([[5, 6, 7]])
  self_mask = jnp.tril(jnp.ones((3, 3), bool))[None]
  cache_mask = jnp.asarray([[True] * 5 + [False]])
  local_self, local_cache = window_masks(2, positions, self_mask, cache_mask)
  np.testing.assert_array_equal(local_self[0], [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
  np.testing.assert_array_equal(local_cache[0], [[0, 0, 0, 0, 1, 0], [0] * 6, [0] * 6])


def test_params_layout_and_logical_axes():
  _, config, params = build("gqa")
  got = {tuple(p.key for p in path): tuple(leaf.shape)
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert got == param_shapes(config)
  init = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert {tuple(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]} == got
  assert set(got) <= set(parallel.PARAM_AXES)
  mesh = parallel.make_mesh(1, 1)
  parallel.param_shardings(params, mesh)  # every leaf has its logical axes


def test_adapters_zero_b_is_the_base_model_and_nonzero_changes_it():
  _, config, params = build("gqa")
  tokens = jnp.asarray(random_tokens(config, (2, 12), seed=9))
  rng = np.random.default_rng(0)
  dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
  zero = {t: {"a": jnp.asarray(rng.normal(0, 0.3, (4, i, 2)), jnp.float32),
              "b": jnp.zeros((4, 2, o), jnp.float32)} for t, (i, o) in dims.items()}
  plain = forward(params, config, tokens).logits
  np.testing.assert_array_equal(np.asarray(forward(params, config, tokens,
                                                   adapters=zero).logits), np.asarray(plain))
  some = jax.tree.map(lambda x: x + 0.2, zero)
  assert np.abs(np.asarray(forward(params, config, tokens, adapters=some).logits)
                - np.asarray(plain)).max() > 1e-3


def test_bfloat16_params_run_close_to_float32():
  _, config, params = build("mqa_softcap")
  tokens = jnp.asarray(random_tokens(config, (1, 12), seed=7))
  ref = forward(params, config, tokens).logits
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert_close(forward(half, config, tokens).logits, ref, rtol=5e-2)


def test_planner_presets_and_windowed_useful_flops():
  from palign_jax import planner

  count = lambda name: sum(int(np.prod(s)) for s in param_shapes(planner.PRESETS[name]).values())
  assert count("gemma3_270m") == 268_098_176 and count("gemma3_1b") == 999_885_952  # published
  c = planner.PRESETS["gemma3_1b"]
  assert c.sliding_layers().count(False) == 4 and c.sliding_window == 512
  windowed = planner.useful_score_flops(c, [1400], [40])
  wide = planner.useful_score_flops(dataclasses.replace(c, sliding_window=None), [1400], [40])
  linear = planner.layer_flops(c, 1, 0) * (1400 + 40) + 2 * c.hidden_size * c.vocab_size
  per_pair = 4 * c.num_heads * c.head_dim
  local_pairs = (512 * 513 / 2 + 512 * (1400 - 512)) + 40 * 512  # each query sees <= 512 keys
  global_pairs = 1400 * 1401 / 2 + 40 * 1400 + 40 * 41 / 2
  assert windowed == pytest.approx(linear + per_pair * (22 * local_pairs + 4 * global_pairs))
  assert wide == pytest.approx(linear + per_pair * 26 * global_pairs)


def test_prefix_shared_scoring_equals_full_sequences():
  """`scoring`'s kernels, unchanged, on Gemma: right-padded contexts longer than the window
  (encoded in two halves from PREFILL_SPLIT_MIN on), questions scored on them, equal to each
  context + question run whole."""
  from palign_jax import scoring

  _, config, params = build("gqa")
  rng = np.random.default_rng(13)
  S, T = scoring.PREFILL_SPLIT_MIN, 8
  context_lengths, question_lengths = np.array([S - 3, 20]), np.array([8, 5, 6])
  contexts = rng.integers(0, config.vocab_size, (2, S)).astype(np.int32)
  questions = rng.integers(0, config.vocab_size, (3, T)).astype(np.int32)
  options = jnp.asarray([3, 5, 7, 11, 13], jnp.int32)
  cache = scoring.encode_prefixes(params, config, jnp.asarray(contexts),
                                  jnp.asarray(context_lengths))
  scores = scoring.score_on_prefixes(params, config, cache, jnp.asarray(context_lengths),
                                     jnp.asarray(questions), jnp.asarray(question_lengths),
                                     options)
  for p, n in enumerate(context_lengths):
    whole = np.zeros((3, S + T), np.int32)
    for q, m in enumerate(question_lengths):
      whole[q, :n + m] = np.concatenate([contexts[p, :n], questions[q, :m]])
    ref = scoring.score_sequences(params, config, jnp.asarray(whole),
                                  jnp.asarray(n + question_lengths), options)
    np.testing.assert_allclose(np.asarray(scores[p]), np.asarray(ref), rtol=1e-5, atol=1e-5)
