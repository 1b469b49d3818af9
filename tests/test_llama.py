"""Parity of the Flax Llama-family forward pass with transformers' PyTorch models.

Tiny random-weight models per variant (MHA, GQA, Qwen2 q/k/v bias, tied/untied embeddings,
Llama 3 RoPE scaling, Mistral), float32. Tolerance: max |ours - torch| <= 1e-5 * max |torch|
(+1e-6 absolute); observed differences are about 5e-7 relative.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from palign_jax.errors import UserInputError  # noqa: E402
from palign_jax.models.config import ModelConfig, RopeScaling  # noqa: E402
from palign_jax.models.llama import KVCache, attention_implementation, init_params  # noqa: E402
from palign_jax.models.llama import forward_jit as forward  # noqa: E402
from palign_jax.models.params import (  # noqa: E402
    fuse_qkv,
    param_shapes,
    params_from_hf_tensors,
    split_qkv,
)

RTOL = 1e-5
LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)

# name -> (transformers class name, our config). Head dim 16 with theta 10000 spans wavelengths
# 6..20,000, so an original context of 64 puts frequencies in all three Llama 3 regimes.
VARIANTS = {
    "llama_mha_untied": ("LlamaForCausalLM", ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama_gqa_tied": ("LlamaForCausalLM", ModelConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=100000.0,
        tie_word_embeddings=True)),
    "llama3_rope_scaling": ("LlamaForCausalLM", ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=LLAMA3)),
    "mistral_gqa": ("MistralForCausalLM", ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
        architecture="mistral")),
    "qwen2_bias_tied": ("Qwen2ForCausalLM", ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=True, tie_word_embeddings=True, architecture="qwen2")),
}


def hf_config(cls_name: str, c: ModelConfig):
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
  kwargs = dict(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
      rope_parameters=rope, tie_word_embeddings=c.tie_word_embeddings,
      max_position_embeddings=512)
  if cls_name == "LlamaForCausalLM":
    kwargs["attention_bias"] = c.attention_bias
  config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
  return config_cls(**kwargs)


@functools.cache
def build(name: str):
  """A random torch model (eager attention) and the same weights as our params pytree."""
  cls_name, config = VARIANTS[name]
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(transformers, cls_name)._from_config(
      hf_config(cls_name, config), attn_implementation="eager")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:  # larger than the default init, so attention and RoPE effects are visible
        p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1)
  model.eval()
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, config, params_from_hf_tensors(config, tensors)


def random_tokens(config, shape, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


def assert_close(ours, ref, rtol=RTOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.max(np.abs(ours - ref))
  scale = np.max(np.abs(ref))
  assert err <= rtol * scale + 1e-6, f"max abs diff {err}, reference scale {scale}"


def torch_logits(model, tokens, position_ids=None):
  with torch.no_grad():
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    pos = None if position_ids is None else torch.from_numpy(np.asarray(position_ids, np.int64))
    return model(input_ids=ids, position_ids=pos).logits.numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name):
  model, config, params = build(name)
  tokens = random_tokens(config, (2, 24))
  # A position offset puts RoPE angles well past the Llama 3 original context.
  positions = np.broadcast_to(np.arange(24) + 100, (2, 24)).astype(np.int32)
  for pos in (None, positions):
    ours = forward(params, config, jnp.asarray(tokens),
                   None if pos is None else jnp.asarray(pos)).logits
    assert_close(ours, torch_logits(model, tokens, pos))


def torch_head_outputs(model, tokens) -> np.ndarray:
  """The input of every layer's o_proj, by forward pre-hook: [B, layers, T, heads * head_dim]."""
  seen = []
  hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
      lambda mod, args: seen.append(args[0].detach().numpy())) for layer in model.model.layers]
  try:
    torch_logits(model, tokens)
  finally:
    for h in hooks:
      h.remove()
  return np.stack(seen, axis=1)


def test_head_outputs_equal_o_proj_input():
  model, config, params = build("llama_gqa_tied")
  tokens = random_tokens(config, (3, 12), seed=1)
  capture = np.array([11, 4, 0], np.int32)
  ref = torch_head_outputs(model, tokens)[np.arange(3), :, capture]
  ref = ref.reshape(3, config.num_layers, config.num_heads, config.head_dim)
  out = forward(params, config, jnp.asarray(tokens), capture_positions=jnp.asarray(capture))
  assert out.head_outputs.shape == (3, config.num_layers, config.num_heads, config.head_dim)
  assert_close(out.head_outputs, ref)


@contextlib.contextmanager
def o_proj_bias(model, delta):
  """Adds `W_o . delta[layer]` to each layer's o_proj output (torch side of steering)."""
  hooks = []
  for i, layer in enumerate(model.model.layers):
    w = layer.self_attn.o_proj.weight  # [hidden, heads*head_dim]
    bias = (w @ torch.from_numpy(np.asarray(delta[i], np.float32).reshape(-1))).detach()
    hooks.append(layer.self_attn.o_proj.register_forward_hook(
        lambda mod, args, out, b=bias: out + b))
  try:
    yield model
  finally:
    for h in hooks:
      h.remove()


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias_tied"])
def test_steering_equals_o_proj_bias(name):
  model, config, params = build(name)
  tokens = random_tokens(config, (2, 10), seed=2)
  delta = np.random.default_rng(3).normal(
      0, 0.3, (config.num_layers, config.num_heads, config.head_dim)).astype(np.float32)
  with o_proj_bias(model, delta):
    ref = torch_logits(model, tokens)
  steered = forward(params, config, jnp.asarray(tokens), steering=jnp.asarray(delta)).logits
  plain = forward(params, config, jnp.asarray(tokens)).logits
  assert_close(steered, ref)
  assert np.abs(np.asarray(steered) - np.asarray(plain)).max() > 1e-3  # steering did something
  zero = forward(params, config, jnp.asarray(tokens), steering=jnp.zeros_like(delta)).logits
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


def test_steering_vmap_equals_per_item_and_compiles_once():
  _, config, params = build("llama_gqa_tied")
  tokens = jnp.asarray(random_tokens(config, (2, 8), seed=4))
  rng = np.random.default_rng(5)
  shape = (3, config.num_layers, config.num_heads, config.head_dim)
  run = jax.jit(jax.vmap(lambda s: forward(params, config, tokens, steering=s).logits))
  batch = jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
  out = np.asarray(run(batch))
  run(jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32))
  assert run._cache_size() == 1
  for i in range(3):
    single = forward(params, config, tokens, steering=batch[i]).logits
    np.testing.assert_allclose(out[i], np.asarray(single), rtol=1e-5, atol=1e-6)
  # A per-row steering batch [B, L, N, H] equals running each row with its own steering.
  rows = forward(params, config, tokens, steering=batch[:2]).logits
  for b in range(2):
    single = forward(params, config, tokens[b:b + 1], steering=batch[b]).logits
    np.testing.assert_allclose(np.asarray(rows[b]), np.asarray(single[0]), rtol=1e-5, atol=1e-6)


def test_kv_cache_and_selected_logits_match_full_forward():
  model, config, params = build("llama3_rope_scaling")
  tokens = random_tokens(config, (2, 20), seed=6)
  ref = torch_logits(model, tokens)
  full = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
  first = forward(params, config, full[:, :12], positions[:, :12], return_kv=True)
  assert first.kv_cache.keys.shape == (config.num_layers, 2, 12, config.num_kv_heads,
                                       config.head_dim)
  second = forward(params, config, full[:, 12:], positions[:, 12:], kv_cache=first.kv_cache)
  assert_close(second.logits, ref[:, 12:])
  # Logits at chosen positions, restricted to a vocabulary subset.
  ids = jnp.asarray([5, 0, 77, 3], jnp.int32)
  picked = forward(params, config, full, logits_positions=jnp.asarray([[3, 19], [0, 7]]),
                   vocab_subset=ids).logits
  assert_close(picked, np.stack([ref[0, [3, 19]], ref[1, [0, 7]]])[..., [5, 0, 77, 3]])
  # A batch-1 cache is shared by all rows; a padded (masked) cache slot changes nothing.
  prefix = forward(params, config, full[:1, :12], positions[:1, :12], return_kv=True).kv_cache
  pad = lambda x: jnp.concatenate([x, jnp.full_like(x[:, :, :3], 7.0)], axis=2)
  padded = KVCache(pad(prefix.keys), pad(prefix.values),
                   jnp.concatenate([prefix.mask, jnp.zeros((1, 3), bool)], axis=1))
  tails = jnp.stack([full[0, 12:], full[1, 12:]])  # row 1 continues row 0's prefix
  shared = forward(params, config, tails, positions[:, 12:], kv_cache=padded).logits
  ref_rows = torch_logits(model, np.concatenate(
      [np.repeat(tokens[:1, :12], 2, 0), np.asarray(tails)], axis=1))
  assert_close(shared, ref_rows[:, 12:])


def test_bfloat16_params_run_close_to_float32():
  _, config, params = build("llama_gqa_tied")
  tokens = jnp.asarray(random_tokens(config, (1, 8), seed=7))
  ref = forward(params, config, tokens).logits
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = forward(half, config, tokens).logits
  assert out.dtype == jnp.float32
  assert_close(out, ref, rtol=5e-2)


# --- the stored layout and the attention kernels ---------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_params_layout_is_the_documented_one(name):
  _, config, params = build(name)
  got = {tuple(p.key for p in path): tuple(leaf.shape)
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert got == param_shapes(config)
  init = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert {tuple(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]} == got


def test_fused_qkv_round_trips_and_groups_query_heads_by_kv_head():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((3, 5, n, 4)) for n in (6, 2, 2))
  fused = fuse_qkv(q, k, v)
  assert fused.shape == (3, 5, 2, 5, 4)  # 3 query heads per kv head, then k, then v
  np.testing.assert_array_equal(fused[:, :, 1, 2], q[:, :, 5])  # head 5 = kv head 1, slot 2
  np.testing.assert_array_equal(fused[:, :, 1, 3], k[:, :, 1])
  for got, want in zip(split_qkv(fused), (q, k, v), strict=True):
    np.testing.assert_array_equal(got, want)


def _with_attention(config, implementation):
  return dataclasses.replace(config, attention=implementation)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias_tied"])
def test_dot_product_attention_computes_what_the_einsum_attention_does(name):
  """The "xla" implementation is `jax.nn.dot_product_attention` with the arguments cuDNN gets
  on a GPU (one key sequence, one boolean mask); float32: 1e-5 of the logits' scale."""
  _, config, params = build(name)
  einsum, xla = _with_attention(config, "einsum"), _with_attention(config, "xla")
  shape = config.num_layers, config.num_heads, config.head_dim
  steering = 0.3 * jax.random.normal(jax.random.PRNGKey(1), shape)
  tokens = jnp.asarray(random_tokens(config, (3, 14), seed=8))
  lengths = jnp.asarray([14, 9, 1])
  mask = jnp.arange(14)[None] < lengths[:, None]
  kwargs = dict(attention_mask=mask, steering=steering, capture_positions=lengths - 1,
                return_kv=True)
  a, b = forward(params, einsum, tokens, **kwargs), forward(params, xla, tokens, **kwargs)
  for row, n in enumerate(lengths.tolist()):  # padding positions are never read
    assert_close(b.logits[row, :n], a.logits[row, :n])
  assert_close(b.head_outputs, a.head_outputs)
  # Continuations of a shared prefix (one cache row for all, padded slots) and of per-row ones.
  positions = 14 + jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))
  tails = jnp.asarray(random_tokens(config, (3, 5), seed=9))
  shared = jax.tree.map(lambda x: x[:, :1] if x.ndim == 5 else x[:1], a.kv_cache)
  for cache in (shared, a.kv_cache):
    kwargs = dict(kv_cache=cache, steering=steering, logits_positions=jnp.asarray([[4]] * 3))
    assert_close(forward(params, xla, tails, positions, **kwargs).logits,
                 forward(params, einsum, tails, positions, **kwargs).logits)
  # bfloat16: both round the same products; they differ by bfloat16's own rounding.
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  kwargs = dict(attention_mask=mask, logits_positions=(lengths - 1)[:, None])
  assert_close(forward(half, xla, tokens, **kwargs).logits,
               forward(half, einsum, tokens, **kwargs).logits, rtol=5e-2)


def test_a_query_that_sees_no_key_stays_finite_under_dot_product_attention():
  # Left padding (generation): the first positions see only padding. The additive mask cuDNN
  # uses would make them NaN and poison the rows; they see themselves instead.
  _, config, params = build("llama_gqa_tied")
  tokens = jnp.asarray(random_tokens(config, (2, 6), seed=10))
  mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
  out = forward(params, _with_attention(config, "xla"), tokens, attention_mask=mask)
  ref = forward(params, _with_attention(config, "einsum"), tokens, attention_mask=mask)
  assert np.isfinite(np.asarray(out.logits)).all()
  assert_close(out.logits[:, 2:], ref.logits[:, 2:])


def test_attention_implementation_is_chosen_per_backend_and_validated():
  _, config, _ = build("llama_gqa_tied")
  assert jax.default_backend() == "cpu"
  assert attention_implementation(config, jnp.bfloat16) == "einsum"  # "auto" on a CPU
  assert attention_implementation(_with_attention(config, "xla"), jnp.float32) == "xla"
  with pytest.raises(UserInputError, match=r"attention must be one of .* got 'flash'"):
    _with_attention(config, "flash").validate()


def _attention_float64(q, k, v, self_mask, cache_k, cache_v, cache_mask):
  """Softmax over [visible cache slots; visible own tokens] in numpy float64, loop by loop."""
  B, T, K, G, H = q.shape
  out = np.zeros(q.shape)
  for b in range(B):
    ck, cv = cache_k[b % len(cache_k)], cache_v[b % len(cache_v)]
    cm = cache_mask[b % len(cache_mask)]
    for t in range(T):
      seen = cm[t] if cm.ndim == 2 else cm
      keys = np.concatenate([ck[seen], k[b][self_mask[b, t]]])  # [S',K,H]
      values = np.concatenate([cv[seen], v[b][self_mask[b, t]]])
      for h in range(K):
        scores = q[b, t, h] @ keys[:, h].T / np.sqrt(H)  # [G,S']
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[b, t, h] = (p / p.sum(-1, keepdims=True)) @ values[:, h]
  return out


@pytest.mark.parametrize("queries", [1, 12])  # 1: the masked path (decoding); 12: the counting
@pytest.mark.parametrize("cache_rows", [1, 3])  # one prefix shared by every row, or one each
def test_attention_over_a_padded_cache_equals_float64(queries, cache_rows):
  """Hidden cache slots hold huge keys and values: had one entered a score's maximum, a
  numerator or a denominator, the result would be off by orders of magnitude. Rows: right
  padding, left padding, and a cache with no visible slot."""
  from palign_jax.models.llama import _attention
  rng = np.random.default_rng(0)
  B, T, K, G, H, S = 3, queries, 2, 3, 16, 9
  q, k, v = (rng.normal(size=s) for s in ((B, T, K, G, H), (B, T, K, H), (B, T, K, H)))
  cache_k, cache_v = (rng.normal(size=(cache_rows, S, K, H)) for _ in range(2))
  cache_mask = np.array([[True] * 6 + [False] * 3, [False] * 2 + [True] * 7, [False] * S]
                        )[:cache_rows]
  cache_k[~cache_mask] *= 1e4
  cache_v[~cache_mask] = 1e6
  self_mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
  self_mask[1, :, T // 2 + 1:] = False  # padding tokens in row 1, seen by no query
  counting = B * T * G > cache_rows * H
  assert counting == (queries > 1)
  as32 = lambda *xs: [jnp.asarray(x, jnp.float32) if x.dtype != bool else jnp.asarray(x)
                      for x in xs]
  out = _attention(*as32(q, k, v, self_mask), tuple(as32(cache_k, cache_v, cache_mask)))
  ref = _attention_float64(q, k, v, self_mask, cache_k, cache_v, cache_mask)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # A per-query (sliding-window) mask takes the masked path with the same result.
  per_query = np.broadcast_to(cache_mask[:, None], (cache_rows, T, S))
  out = _attention(*as32(q, k, v, self_mask), tuple(as32(cache_k, cache_v, per_query)))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
