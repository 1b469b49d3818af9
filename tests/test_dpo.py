"""DPO with LoRA: the side path, the loss and its gradient, batched training, the PAPI protocol.

References: a float64 numpy Llama written here from the architecture (whole prompt +
completion in one causal pass, LoRA as explicit `x a b`), its loss and finite-difference
directional derivatives; LoRA against the same model with merged kernels; training a batch of
rows against training each row alone. The protocol runs on the tiny random model of
`conftest.py` with a few steps.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_run_config

from palign_jax import data, prompts, readout, scoring
from palign_jax.dpo import lora
from palign_jax.dpo import train as dpo_train
from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import adapter_dims, init_params
from palign_jax.models.llama import forward_jit as forward
from palign_jax.models.params import fuse_qkv, split_qkv
from palign_jax.protocol import dpo, records
from palign_jax.protocol import profile as profile_lib

# GQA with q/k/v biases and tied embeddings: every branch of the attention the side path touches.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                     rope_theta=10000.0, attention_bias=True, tie_word_embeddings=True)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@functools.cache
def model():
  """Random parameters (numpy, so nothing compiles per leaf), larger than the default init and
  with non-zero biases and norms, so that every term matters."""
  shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  leaf = lambda path, x: jnp.asarray(
      (1 + 0.1 * rng.standard_normal(x.shape)) if path[-1].key == "scale" else
      (0.1 * rng.standard_normal(x.shape)) if path[-1].key == "bias" else
      0.16 * rng.standard_normal(x.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_adapters(seed, rank=3, lead=(), scale=0.3):
  """Adapters with non-zero a and b (forward form), every target."""
  rng = np.random.default_rng(seed)
  out = {}
  for t in TARGETS:
    d_in, d_out = adapter_dims(CONFIG, t)
    out[t] = {"a": jnp.asarray(rng.uniform(-1, 1, (*lead, 2, d_in, rank)) * 3 / np.sqrt(d_in),
                               jnp.float32),
              "b": jnp.asarray(scale * rng.standard_normal((*lead, 2, rank, d_out)), jnp.float32)}
  return out


@functools.cache
def toy_preferences(seed=0):
  """Five random prompts with three random completions each, ragged lengths."""
  rng = np.random.default_rng(seed)
  prompt_ids = [rng.integers(0, CONFIG.vocab_size, n) for n in (6, 9, 4, 7, 8)]
  completions = [[rng.integers(0, CONFIG.vocab_size, n) for n in (3, 1, 4)] for _ in prompt_ids]
  return prompt_ids, completions, dpo_train.PreferenceData.build(prompt_ids, completions)


# --- an independent float64 numpy model ---------------------------------------------------------

def numpy_log_prob(params, adapters, tokens, start):
  """log p(tokens[start:] | tokens[:start]) by one causal pass in float64 (LoRA as x a b)."""
  c = CONFIG
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ad = jax.tree.map(lambda x: np.asarray(x, np.float64), adapters or {})
  T = len(tokens)
  x = p["embed_tokens"]["embedding"][tokens]
  inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  angles = np.arange(T)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
  rope = lambda v: v * cos[:, None] + np.concatenate([-v[..., c.head_dim // 2:],
                                                      v[..., :c.head_dim // 2]], -1) * sin[:, None]
  norm = lambda v, w: w * v / np.sqrt(np.mean(v * v, -1, keepdims=True) + c.rms_norm_eps)
  side = lambda name, v, i: (v @ ad[name]["a"][i] @ ad[name]["b"][i]) if name in ad else 0.0
  for i in range(c.num_layers):
    layer = jax.tree.map(lambda w, i=i: w[i], p["layers"])
    attn = layer["attn"]
    h = norm(x, layer["input_layernorm"]["scale"])
    kernels = split_qkv(attn["qkv_proj"]["kernel"])  # [hidden, n, head_dim] each
    biases = split_qkv(attn["qkv_proj"]["bias"])
    proj = lambda j, name, n, h=h, i=i, kernels=kernels, biases=biases: (
        np.einsum("td,dnh->tnh", h, kernels[j]) + biases[j]
        + np.reshape(side(name, h, i) + np.zeros((T, n * c.head_dim)), (T, n, c.head_dim)))
    q, k, v = (proj(0, "q_proj", c.num_heads), proj(1, "k_proj", c.num_kv_heads),
               proj(2, "v_proj", c.num_kv_heads))
    q, k = rope(q), rope(k)
    groups = c.num_heads // c.num_kv_heads
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(c.head_dim)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("nts,snh->tnh", weights, v).reshape(T, -1)
    x = x + heads @ attn["o_proj"]["kernel"].reshape(-1, c.hidden_size) + side("o_proj", heads, i)
    h = norm(x, layer["post_attention_layernorm"]["scale"])
    gate_up = layer["mlp"]["gate_up_proj"]["kernel"]  # [hidden, 2, intermediate]
    gate, up = h @ gate_up[:, 0], h @ gate_up[:, 1]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ layer["mlp"]["down_proj"]["kernel"]
  logits = norm(x, p["norm"]["scale"]) @ p["embed_tokens"]["embedding"].T
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  return sum(log_probs[t - 1, tokens[t]] for t in range(start, T))


def numpy_dpo_loss(params, adapters, pairs, beta):
  prompt_ids, completions, _ = toy_preferences()
  seq = lambda i, o: np.concatenate([prompt_ids[i], completions[i][o]])
  lp = lambda i, o, ad: numpy_log_prob(params, ad, seq(i, o), len(prompt_ids[i]))
  losses = []
  for i, chosen, rejected in pairs:
    margin = (lp(i, chosen, adapters) - lp(i, chosen, None)) - (
        lp(i, rejected, adapters) - lp(i, rejected, None))
    losses.append(np.log1p(np.exp(-beta * margin)))
  return float(np.mean(losses))


# --- LoRA in the model --------------------------------------------------------------------------

def test_lora_with_zero_b_is_exactly_the_base_model():
  params = model()
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 11)))
  base = forward(params, CONFIG, tokens, return_kv=True)
  zero = lora.init_adapters(jax.random.PRNGKey(2), CONFIG, rank=4, targets=TARGETS)
  assert float(jnp.abs(zero["q_proj"]["a"]).max()) > 0  # a is random, b is zero
  for adapters in (zero, jax.tree.map(lambda x: jnp.stack([x] * 3), zero)):  # shared, per row
    out = forward(params, CONFIG, tokens, return_kv=True, adapters=adapters)
    np.testing.assert_array_equal(out.logits, base.logits)
    np.testing.assert_array_equal(out.kv_cache.keys, base.kv_cache.keys)
    np.testing.assert_array_equal(out.kv_cache.values, base.kv_cache.values)


def test_lora_side_path_equals_merged_kernels():
  """`(x a) b` next to each kernel equals the model whose kernels have `a b` added; per-row
  adapters equal running each row alone."""
  params = model()
  adapters = random_adapters(3)
  merged = jax.tree.map(lambda x: x, params)
  attn = merged["layers"]["attn"]
  kernels = dict(zip(("q_proj", "k_proj", "v_proj"), split_qkv(attn["qkv_proj"]["kernel"]),
                     strict=True), o_proj=attn["o_proj"]["kernel"])
  for name, f in adapters.items():
    delta = jnp.einsum("lir,lro->lio", f["a"], f["b"])
    kernels[name] = kernels[name] + delta.reshape(kernels[name].shape)
  attn["qkv_proj"]["kernel"] = fuse_qkv(kernels["q_proj"], kernels["k_proj"], kernels["v_proj"])
  attn["o_proj"]["kernel"] = kernels["o_proj"]
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CONFIG.vocab_size, (2, 10)))
  ours = forward(params, CONFIG, tokens, adapters=adapters).logits
  ref = forward(merged, CONFIG, tokens).logits
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  assert float(jnp.abs(ours - forward(params, CONFIG, tokens).logits).max()) > 1e-2
  rows = random_adapters(5, lead=(2,))
  batched = forward(params, CONFIG, tokens, adapters=rows).logits
  for r in range(2):
    alone = forward(params, CONFIG, tokens[r:r + 1],
                    adapters=jax.tree.map(lambda x, r=r: x[r], rows)).logits
    np.testing.assert_allclose(batched[r:r + 1], alone, rtol=1e-5, atol=1e-5)


def test_scoring_with_per_context_adapters_equals_full_forwards():
  """Prefix-shared scoring gathers each context's adapter for its cache and its questions,
  whatever the batching: the same as one full forward of context + question."""
  params = model()
  rng = np.random.default_rng(6)
  contexts = [rng.integers(0, CONFIG.vocab_size, n) for n in (9, 14, 11)]
  questions = [rng.integers(0, CONFIG.vocab_size, n) for n in (4, 7, 2)]
  options = np.array([3, 17, 29, 40, 51])
  adapters = random_adapters(8, lead=(3,))
  pairs = np.array([[2, 0], [0, 0], [1, 0], [2, 0]])
  # Two batches of two pairs (one compiled shape), context 2 in both, in another order.
  got = scoring.score_contexts(params, CONFIG, contexts, questions, options, pairs=pairs,
                               question_batch=3, prefix_batch=2, adapters=adapters)
  # The reference: every (pair, question) prompt in one right-padded batch, one adapter a row.
  prompts_ = [np.concatenate([contexts[c], q]) for c, _ in pairs for q in questions]
  tokens = np.zeros((len(prompts_), max(map(len, prompts_))), np.int32)
  for i, p in enumerate(prompts_):
    tokens[i, :len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts_])
  rows = np.repeat(pairs[:, 0], len(questions))
  logits = forward(params, CONFIG, jnp.asarray(tokens),
                   attention_mask=jnp.arange(tokens.shape[1])[None] < lengths[:, None],
                   logits_positions=(lengths - 1)[:, None],
                   adapters=jax.tree.map(lambda x: x[rows], adapters)).logits[:, 0]
  ref = jax.nn.log_softmax(logits)[:, options].reshape(got.shape)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserInputError, match="leading axis of 3"):
    scoring.score_contexts(params, CONFIG, contexts, questions, options, question_batch=2,
                           prefix_batch=2, adapters=random_adapters(8, lead=(2,)))


def test_adapter_shapes_are_checked():
  params = model()
  tokens = jnp.zeros((2, 5), jnp.int32)
  good = random_adapters(0)
  with pytest.raises(ValueError, match="adapter target"):
    forward(params, CONFIG, tokens, adapters={"up_proj": good["q_proj"]})
  with pytest.raises(ValueError, match="do not fit"):
    forward(params, CONFIG, tokens, adapters={"k_proj": good["q_proj"]})
  with pytest.raises(ValueError, match="leading batch"):
    forward(params, CONFIG, tokens, adapters=jax.tree.map(lambda x: jnp.stack([x] * 3), good))
  with pytest.raises(ValueError, match="LoRA targets"):
    lora.parse_targets("q_proj,mlp")


# --- the loss and its gradient ------------------------------------------------------------------

def test_dpo_loss_and_gradient_match_float64_numpy():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
  w = np.array([1, 1, 0, 1, 1, 0.5])
  beta = 0.3
  margin = beta * ((pc - rc) - (pr - rr))
  ref_loss = np.sum(w * np.log1p(np.exp(-margin))) / w.sum()
  ref_grad = -beta * w / (1 + np.exp(margin)) / w.sum()  # d loss / d policy_chosen
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  loss, (g_c, g_r) = jax.value_and_grad(
      lambda a, b: dpo_train.dpo_loss(a, b, f32(rc), f32(rr), beta, f32(w)), argnums=(0, 1))(
          f32(pc), f32(pr))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(g_c, ref_grad, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g_r, -ref_grad, rtol=1e-5, atol=1e-9)


def test_model_dpo_loss_and_gradient_match_float64_numpy():
  """The whole path on a tiny model: completion log-probabilities (prompt cached, completions
  branching from it) and the DPO loss against one float64 numpy pass per sequence; the
  gradient against float64 central differences along random directions in adapter space."""
  params = model()
  _, _, pref = toy_preferences()
  pairs = [(0, 0, 1), (1, 2, 0), (3, 1, 2), (4, 0, 2)]
  beta, scale = 0.5, 2.0
  trainable = {t: {"a": f["a"], "b": f["b"] / scale} for t, f in random_adapters(7).items()}
  reference = dpo_train.reference_log_probs(params, CONFIG, pref)
  for i, o in [(0, 0), (1, 2), (4, 1)]:
    prompt_ids, completions, _ = toy_preferences()
    seq = np.concatenate([prompt_ids[i], completions[i][o]])
    np.testing.assert_allclose(reference[i, o], numpy_log_prob(params, None, seq,
                                                               len(prompt_ids[i])), rtol=2e-5)
  items, chosen, rejected = (jnp.asarray(x) for x in np.array(pairs).T)
  loss_fn = lambda ad: dpo_train.row_loss(ad, params, CONFIG, pref, jnp.asarray(reference),
                                          items, chosen, rejected, jnp.ones(len(pairs)), beta,
                                          scale)
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  numpy_loss = lambda ad: numpy_dpo_loss(params, lora.for_forward(ad, scale), pairs, beta)
  to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  np.testing.assert_allclose(loss, numpy_loss(to64(trainable)), rtol=2e-5)
  assert abs(float(loss) - np.log(2)) > 1e-2  # the adapters moved the policy off the reference
  rng = np.random.default_rng(1)
  for _ in range(3):
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape), to64(trainable))
    norm = np.sqrt(sum(np.sum(v * v) for v in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda v, norm=norm: v / norm, direction)  # a unit direction
    eps = 1e-5
    shifted = lambda sign, d=direction, eps=eps: jax.tree.map(
        lambda x, u: x + sign * eps * u, to64(trainable), d)
    numeric = (numpy_loss(shifted(1)) - numpy_loss(shifted(-1))) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * v)) for g, v in zip(
        jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)


# --- generation under an adapter ---------------------------------------------------------------

def greedy_by_full_forwards(params, prompt, steps, adapters=None, width=16):
  """The reference: re-run the whole sequence each step, append the most likely token. The
  sequence is right-padded to `width` (causal attention: padding after the last real token
  changes nothing before it), so every step is the same compiled shape."""
  tokens = list(prompt)
  for _ in range(steps):
    padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
    logits = forward(params, CONFIG, padded, adapters=adapters).logits
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_generation_with_an_adapter_equals_full_forwards():
  params = model()
  rng = np.random.default_rng(11)
  prompts_ = [rng.integers(0, CONFIG.vocab_size, n) for n in (5, 9)]
  adapters = random_adapters(12, scale=1.0)
  with_adapter = scoring.generate(params, CONFIG, prompts_, 6, adapters=adapters)
  without = scoring.generate(params, CONFIG, prompts_, 6)
  for i, prompt in enumerate(prompts_):  # ragged prompts: left padding must not leak
    assert list(with_adapter[i]) == greedy_by_full_forwards(params, prompt, 6, adapters)
    assert list(without[i]) == greedy_by_full_forwards(params, prompt, 6)
  assert any(list(a) != list(b) for a, b in zip(with_adapter, without, strict=True))
  stop = int(without[0][2])  # an eos id ends the row after it is emitted
  cut = scoring.generate(params, CONFIG, prompts_[:1], 6, eos_ids=[stop])[0]
  assert list(cut) == list(without[0][:list(without[0]).index(stop) + 1])
  with pytest.raises(UserInputError, match="leading axis"):
    scoring.generate(params, CONFIG, prompts_, 2, adapters=random_adapters(0, lead=(3,)))


# --- training -----------------------------------------------------------------------------------

ROWS = [[(0, 0, 1), (1, 2, 0), (2, 1, 2), (3, 0, 2), (4, 1, 0)], [(0, 1, 0), (3, 2, 1)],
        [(2, 0, 1), (4, 2, 1), (1, 1, 0)]]
SETTINGS = dpo_train.TrainSettings(beta=0.5, lora_scale=2.0, max_steps=6, eval_every=3,
                                   pairs_per_step=3)


def run_rows(rows, seeds, lrs, groups=None, settings=SETTINGS):
  params = model()
  _, _, pref = toy_preferences()
  reference = dpo_train.reference_log_probs(params, CONFIG, pref)
  init = jax.tree.map(lambda x: jnp.stack([x] * len(rows)), lora.init_adapters(
      jax.random.PRNGKey(9), CONFIG, rank=2, targets=("q_proj", "v_proj", "o_proj")))
  return dpo_train.train(params, CONFIG, pref, reference, dpo_train.RowPairs.build(rows, 5),
                         init, settings, learning_rates=lrs, seeds=seeds, groups=groups)


def test_vmapped_training_equals_training_each_row_alone():
  together = run_rows(ROWS, seeds=[11, 12, 13], lrs=[1e-2, 2e-2, 1e-2])
  assert together.loss.shape == (3, 6) and list(together.steps) == [0, 3, 6]
  for r in range(3):
    alone = run_rows(ROWS[r:r + 1], seeds=[11 + r], lrs=[[1e-2, 2e-2, 1e-2][r]])
    np.testing.assert_allclose(together.loss[r], alone.loss[0], rtol=1e-5, atol=1e-6)
    # Adam divides by the gradient's running RMS, so a coordinate whose gradient is ~0 moves by
    # up to the learning rate on float32 rounding alone: parameters agree to ~1e-3 of the
    # learning rate (atol), not to float32 precision.
    for a, b in zip(jax.tree.leaves(together.snapshots), jax.tree.leaves(alone.snapshots),
                    strict=True):
      np.testing.assert_allclose(a[r], b[0], rtol=1e-4, atol=2e-5)
  # The rows really trained, each its own way, and snapshot 0 is the untrained adapter.
  b = together.snapshots["v_proj"]["b"]
  assert float(jnp.abs(b[:, 0]).max()) == 0
  assert float(jnp.abs(b[:, -1]).max(axis=(1, 2, 3)).min()) > 1e-3
  assert float(jnp.abs(b[0, -1] - b[1, -1]).max()) > 1e-3


def test_training_lowers_the_dpo_loss():
  params = model()
  _, _, pref = toy_preferences()
  rows = ROWS[:1]
  settings = SETTINGS._replace(max_steps=24)  # the same compiled chunk, 8 times
  result = run_rows(rows, seeds=[0], lrs=[2e-2], settings=settings)
  assert result.loss[0, 0] == pytest.approx(np.log(2), rel=1e-5)  # b = 0: the reference
  reference = jnp.asarray(dpo_train.reference_log_probs(params, CONFIG, pref))
  items, chosen, rejected = (jnp.asarray(x) for x in np.array(rows[0]).T)
  loss_of = jax.jit(lambda trainable: dpo_train.row_loss(
      trainable, params, CONFIG, pref, reference, items, chosen, rejected, jnp.ones(len(items)),
      settings.beta, settings.lora_scale))
  full_loss = [float(loss_of({t: {"a": f["a"][0, c], "b": f["b"][0, c] / settings.lora_scale}
                              for t, f in result.snapshots.items()})) for c in (0, 4, 8)]
  assert full_loss[0] == pytest.approx(np.log(2), rel=1e-5)
  assert full_loss[2] < full_loss[1] < 0.6 * full_loss[0]


def test_a_nan_stops_only_its_group_and_the_others_train_as_alone():
  result = run_rows(ROWS, seeds=[11, 12, 13], lrs=[1e-2, float("nan"), 1e-2], groups=[0, 1, 1])
  assert list(result.stopped_at) == [-1, 0, 0]
  assert list(result.stopped_by_group) == [False, False, True]
  assert np.isfinite(result.loss[0]).all() and np.isnan(result.loss[1:, 1:]).all()
  assert len(result.messages) == 2 and "row 1: training stopped at step 1" in result.messages[0]
  assert "another row of its group" in result.messages[1]
  for leaf in jax.tree.leaves(result.snapshots):  # stopped rows keep finite (untrained) adapters
    assert np.isfinite(np.asarray(leaf)).all()
  alone = run_rows(ROWS[:1], seeds=[11], lrs=[1e-2])
  np.testing.assert_allclose(result.loss[0], alone.loss[0], rtol=1e-5, atol=1e-6)


def test_pair_schedule_walks_epochs_and_pads_small_rows():
  indices, weights = dpo_train.pair_schedule(np.array([5, 2, 0]), 4, 3, seeds=[1, 2, 3])
  first_epoch = indices[:, 0].ravel()[:5]
  assert sorted(first_epoch) == list(range(5)) and (weights[:, 0] == 1).all()
  assert (indices[:, 1, :2] == [0, 1]).all() and (weights[:, 1] == [1, 1, 0]).all()
  assert (weights[:, 2] == 0).all()
  again, _ = dpo_train.pair_schedule(np.array([5]), 4, 3, seeds=[1])
  np.testing.assert_array_equal(again[:, 0], indices[:, 0])  # a row's own seed only



def test_a_fixed_pair_width_and_row_count_compile_one_training_program():
  """Batches whose natural widths (most pairs of a row: 5, 2, 3) and row counts (2, 1, 2)
  differ run one compiled training program when the run fixes both."""
  batches = [[ROWS[0], ROWS[1]], [ROWS[1]], [ROWS[2], ROWS[1]]]
  natural = [dpo_train.RowPairs.build(b).prompt.shape for b in batches]
  assert len(set(natural)) == 3  # without the fixed width each batch would compile anew
  settings = SETTINGS._replace(max_steps=2, eval_every=1, pairs_per_step=2)
  params, (_, _, pref) = model(), toy_preferences()
  reference = dpo_train.reference_log_probs(params, CONFIG, pref)
  init = lora.init_adapters(jax.random.PRNGKey(9), CONFIG, rank=2, targets=("q_proj",),
                            lead=(2,))
  before, sizes = dpo_train._train_chunk._cache_size(), []
  for batch in batches:
    n = len(batch)
    dpo_train.train(params, CONFIG, pref, reference, dpo_train.RowPairs.build(batch, width=5),
                    jax.tree.map(lambda x, n=n: x[:n], init), settings,
                    learning_rates=[1e-2] * n, seeds=range(n), rows=2)
    sizes.append(dpo_train._train_chunk._cache_size() - before)
  assert sizes == [1, 1, 1]
  with pytest.raises(ValueError, match="more than the fixed width 4"):
    dpo_train.RowPairs.build(batches[0], width=4)


def test_a_diverging_rate_stops_its_row_and_the_others_train_as_without_it():
  """A huge learning rate for one row: that row stops; the others' losses and adapters are
  those of a run without it (vmapped rows agree to Adam's float32 rounding, see above)."""
  result = run_rows(ROWS, seeds=[11, 12, 13], lrs=[1e-2, 1e30, 1e-2])
  assert list(result.stopped_at >= 0) == [False, True, False]
  assert not result.stopped_by_group.any()
  without = run_rows([ROWS[0], ROWS[2]], seeds=[11, 13], lrs=[1e-2, 1e-2])
  np.testing.assert_allclose(result.loss[[0, 2]], without.loss, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(result.snapshots), jax.tree.leaves(without.snapshots),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a)[[0, 2]], b, rtol=1e-4, atol=2e-5)
    assert np.isfinite(np.asarray(a)[[0, 2]]).all()


def test_a_training_step_costs_about_two_forwards():
  """XLA's own FLOP count (`cost_analysis`) of the loss and of its gradient: with respect to
  the LoRA factors alone (the base frozen) about 2x the forward, as bench_dpo counts training
  (`TRAIN_OVER_FORWARD`), and about 3x once the base's weight gradients are formed too."""
  params, (_, _, pref) = model(), toy_preferences()
  reference = jnp.asarray(dpo_train.reference_log_probs(params, CONFIG, pref))
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init_adapters(
      jax.random.PRNGKey(0), CONFIG, rank=2, targets=("q_proj", "v_proj")))
  items, chosen, rejected = (jnp.asarray(x) for x in np.array(ROWS[0][:4]).T)
  loss = lambda trainable, base: dpo_train.row_loss(
      trainable, base, CONFIG, pref, reference, items, chosen, rejected, jnp.ones(4), 0.5, 2.0)
  flops = lambda f: jax.jit(f).lower(adapters, params).compile().cost_analysis()["flops"]
  forward = flops(loss)
  lora_only = flops(jax.value_and_grad(loss)) / forward
  with_base = flops(jax.value_and_grad(loss, argnums=(0, 1))) / forward
  assert 1.8 < lora_only < 2.4 and 2.8 < with_base < 3.4, (lora_only, with_base)

# --- the PAPI protocol --------------------------------------------------------------------------

HELDOUT = data.load_split().heldout[::6]
DPO_OVERRIDES = {"dpo.max_steps": 4, "dpo.eval_every": 2, "dpo.pairs_per_step": 4,
                 "dpo.rank": 2, "dpo.learning_rates": (3e-2,)}


def dpo_settings(**overrides):
  return dpo.DpoSettings.from_config(tiny_run_config("unused", **{**DPO_OVERRIDES, **overrides}))


def three_subjects():
  """Two PAPI subjects and one who answered every known item with 3 (no usable pairs)."""
  papi = data.load_papi_subjects()
  two = papi.select([papi.ids[0], papi.ids[1]])
  neutral = np.where(np.arange(300)[None] >= 0, 3, 0).astype(np.int8)
  return data.Subjects(two.ids + ("all_neutral",), np.concatenate([two.answers, neutral]))


@pytest.fixture(scope="module")
def dpo_results(tiny_engine):
  return dpo.align_subjects(tiny_engine, three_subjects(), dpo_settings(), heldout=HELDOUT)


def test_preference_pairs_and_their_tokens(tiny_engine):
  answers = np.array([5, 4, 3, 2, 1, 0])
  assert dpo.preference_pairs(answers) == [(0, 0, 4), (1, 1, 4), (3, 3, 0), (4, 4, 0)]
  assert len(dpo.preference_pairs(answers, "all_others")) == 5 * 4
  assert dpo.preference_pairs(np.array([3, 0, 3])) == []
  assert dpo.answer_text("B") == "Option (B). Moderately Accurate"
  pref = dpo.preference_data(tiny_engine)
  assert pref.prompts.shape[0] == 120 and pref.branches.shape[1] == 5
  tokenizer = tiny_engine.model.tokenizer
  branch = np.asarray(pref.branches[0, 1])[:int(pref.branch_lengths[0, 1])]
  assert tokenizer.decode(branch[1:]) == "Option (B). Moderately Accurate<|im_end|>"
  prompt = list(np.asarray(pref.prompts[0])[:int(pref.prompt_lengths[0])]) + [int(branch[0])]
  text = data.load_items().text[data.load_split().known[0]]
  assert prompt == prompts.encode_chat_prompt(tokenizer, prompts.DEFAULT_SYSTEM_PROMPT,
                                              prompts.question(text))


def test_protocol_result(dpo_results, tiny_engine):
  settings = dpo_settings()
  first, second, neutral = dpo_results
  assert [r.subject_id for r in dpo_results][2] == "all_neutral"
  for r in (first, second):
    assert r.trained and r.num_pairs > 0 and r.chosen_steps in (0, 2, 4)
    assert set(r.fold_error) == set(settings.decodings)
    assert all(e.shape == (1, 3) and np.isfinite(e).all() for e in r.fold_error.values())
    # The shared selection: the readout best at step 0, then the fewest steps within one
    # standard error of the best (protocol.selection).
    at_zero = {d: r.fold_error[d][0, 0] for d in r.decodings}
    assert r.chosen_decoding == min(r.decodings, key=lambda d: (at_zero[d],
                                                                r.decodings.index(d)))
    chosen = r.fold_error[r.chosen_decoding][0, list(r.candidate_steps).index(r.chosen_steps)]
    assert r.selection["chosen"] == r.chosen_steps and r.selection["decoding"] == (
        r.chosen_decoding)
    assert chosen <= r.selection["bar"] + 1e-12
    assert all(e > r.selection["bar"] for e in r.fold_error[r.chosen_decoding][0][
        :list(r.candidate_steps).index(r.chosen_steps)])
    assert r.test_log_probs.shape == (len(HELDOUT), 5) and r.test_prior.shape == (5,)
    assert r.known_log_probs.shape == (120, 5) and r.loss.shape == (1, 4)
    assert r.loss[0, 0] == pytest.approx(np.log(2), rel=1e-4)
    assert r.adapters["q_proj"]["a"].shape == (3, 32, 2)
    assert r.adapters["v_proj"]["b"].shape == (3, 2, 16)
    assert r.predictions().shape == (len(HELDOUT),)
  assert set(first.work["stage_seconds"]) >= {"train", "fold_sweep", "reference", "base_sweep"}
  # Fixed by the rule and the batch, not the answers: 120 items x 1 far_end pair; 3 subjects
  # (the skipped one included) x (2 folds + all items) x 1 rate.
  assert first.work["train_shapes"]["pairs_per_row"] == 120
  assert first.work["train_shapes"]["rows"] == 9
  # The all-3 subject was skipped, with a message, and is the base model.
  assert not neutral.trained and neutral.adapters is None and neutral.num_pairs == 0
  assert "no usable preference pairs" in neutral.note and neutral.chosen_steps == 0
  base, _ = tiny_engine.score([tiny_engine.context_tokens(prompts.DEFAULT_SYSTEM_PROMPT)],
                              HELDOUT, content_free=True)
  np.testing.assert_allclose(neutral.test_log_probs, base[0], rtol=1e-6)
  assert np.isnan(neutral.fold_error["argmax"][0, 1:]).all()


def test_saved_and_reloaded_adapters_give_the_same_scores(dpo_results, tiny_engine, tmp_path):
  result = dpo_results[0]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "adapters", result.adapters)
  with ocp.StandardCheckpointer() as checkpointer:
    reloaded = checkpointer.restore(tmp_path / "adapters")
  context = tiny_engine.context_tokens(prompts.DEFAULT_SYSTEM_PROMPT)
  scores, prior = tiny_engine.score([context], HELDOUT, content_free=True,
                                    adapters=jax.tree.map(lambda x: np.asarray(x)[None], reloaded))
  np.testing.assert_allclose(scores[0], result.test_log_probs, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(prior[0], result.test_prior, rtol=1e-6, atol=1e-6)
  if result.chosen_steps:  # a trained adapter is not the base model (the all-3 subject's)
    assert float(np.abs(scores[0] - dpo_results[2].test_log_probs).max()) > 1e-4


def test_a_nan_stops_only_that_subject_and_test_answers_are_never_read(dpo_results, tiny_engine,
                                                                       monkeypatch):
  """A NaN learning rate in the second subject's rows stops that subject alone; the first
  subject's result is unchanged, even with every held-out answer changed."""
  real_train = dpo_train.train

  def poisoned(*args, learning_rates, row_names, **kwargs):
    rates = [float("nan") if name.startswith(f"subject {dpo_results[1].subject_id} ")
             else rate for rate, name in zip(learning_rates, row_names, strict=True)]
    return real_train(*args, learning_rates=rates, row_names=row_names, **kwargs)

  monkeypatch.setattr(dpo_train, "train", poisoned)
  subjects = three_subjects()
  answers = subjects.answers.copy()
  answers[:, HELDOUT] = answers[:, HELDOUT] % 5 + 1
  again = dpo.align_subjects(tiny_engine, data.Subjects(subjects.ids, answers), dpo_settings(),
                             heldout=HELDOUT)
  first, stopped = again[0], again[1]
  assert "training stopped at step 1" in stopped.note and "not finite" in stopped.note
  assert stopped.chosen_steps == 0 and np.isnan(stopped.fold_error["argmax"][0, 1:]).all()
  np.testing.assert_allclose(stopped.test_log_probs, dpo_results[2].test_log_probs, rtol=1e-6)
  assert first.note is None and first.chosen_steps == dpo_results[0].chosen_steps
  np.testing.assert_allclose(first.test_log_probs, dpo_results[0].test_log_probs, rtol=1e-6)
  for d in first.decodings:
    np.testing.assert_allclose(first.fold_error[d], dpo_results[0].fold_error[d], rtol=1e-6)



def test_the_smaller_rate_wins_a_tie_at_the_same_steps():
  """`_select`'s order (its docstring): step 0, then fewer steps first and, at equal steps, the
  smaller learning rate (less change), whatever the config's order of the rates. Two rates
  whose snapshots score identically at step 1 (both right, step 0 wrong) tie exactly."""
  assert dpo._candidates([1e-3, 1e-4], 3) == [(0, 0), (1, 1), (0, 1), (1, 2), (0, 2)]
  assert dpo._candidates([1e-4, 1e-4], 2) == [(0, 0), (0, 1), (1, 1)]  # equal: config order
  settings = dpo_settings(**{"readout.choice": "argmax"})
  known = data.load_papi_subjects().answers[0][data.load_split().known].astype(np.int32)
  known = np.where(known > 0, known, 3)
  letters = lambda answers: np.log(np.where(
      np.eye(5)[[dpo._letter(a) for a in answers]] > 0, 0.96, 0.01))  # letter mass 1
  log_probs = np.stack([letters(6 - known), letters(known)])  # [C=2, 120, 5]
  log_probs = np.broadcast_to(log_probs, (2, 2, 120, 5))  # both rates alike: [L, C, 120, 5]
  prior = np.full((2, 2, 2, 5), np.log(0.2))
  fold = dpo.alignment.fold_of_known_items(2, 0)
  for rates, smaller in (([1e-3, 1e-4], 1), ([1e-4, 1e-3], 0)):
    pick, grid, candidates, labels = dpo._select(
        log_probs, prior, known, fold, settings, np.ones((2, 2), bool), rates, np.array([0, 4]))
    assert candidates[pick.index] == (smaller, 1), labels[pick.index]
    assert grid[pick.decoding][0, 1] == grid[pick.decoding][1, 1]  # a true tie
  # A rate that stopped before step 4 is not a candidate there; the other rate still is.
  usable = np.array([[True, False], [True, True]])
  pick, grid, candidates, _ = dpo._select(log_probs, prior, known, fold, settings, usable,
                                          [1e-3, 1e-4], np.array([0, 4]))
  assert candidates[pick.index] == (1, 1) and np.isnan(grid[pick.decoding][0, 1])


def test_a_diverging_rate_stops_only_that_rate_of_each_subject(dpo_results, tiny_engine):
  """Rows are grouped by (subject, learning rate): with a second, infinite rate, its rows stop
  (a huge finite one may not: the RMS norms absorb huge adapters, the loss staying finite) and
  every subject's 3e-2 rows train, are scored and error as in the one-rate run."""
  again = dpo.align_subjects(tiny_engine, three_subjects(),
                             dpo_settings(**{"dpo.learning_rates": (3e-2, float("inf"))}),
                             heldout=HELDOUT)
  for result, alone in zip(again[:2], dpo_results[:2], strict=True):
    assert "at learning rate inf stopped" in (result.note or ""), result.note
    assert result.chosen_learning_rate == pytest.approx(3e-2) or result.chosen_steps == 0
    assert np.isfinite(result.loss[0]).all() and np.isnan(result.loss[1, 1:]).all()
    np.testing.assert_allclose(result.loss[0], alone.loss[0], rtol=1e-5, atol=1e-6)
    for d in result.decodings:
      np.testing.assert_allclose(result.fold_error[d][0], alone.fold_error[d][0], rtol=1e-6)
      assert np.isnan(result.fold_error[d][1, 1:]).all()


def test_another_batch_reuses_the_training_program(dpo_results, tiny_engine):
  """Other subjects (most pairs 100, not 85; the skipped subject second, not third) in a batch
  of the same size: no new training or reference program."""
  papi = data.load_papi_subjects()
  most = lambda answers: max(len(dpo.preference_pairs(a[data.load_split().known]))
                             for a in answers)
  assert most(papi.answers[2:4]) != most(three_subjects().answers)
  subjects = data.Subjects((papi.ids[2], "neutral", papi.ids[3]), np.stack(
      [papi.answers[2], np.full(300, 3, papi.answers.dtype), papi.answers[3]]))
  sizes = lambda: (dpo_train._train_chunk._cache_size(), dpo_train._reference_chunk._cache_size())
  before = sizes()
  results = dpo.align_subjects(tiny_engine, subjects, dpo_settings(), heldout=HELDOUT)
  assert [r.trained for r in results] == [True, False, True]
  assert sizes() == before

def test_settings_are_checked():
  with pytest.raises(UserInputError, match="config.dpo.targets"):
    dpo_settings(**{"dpo.targets": "q_proj,gate_proj"})
  with pytest.raises(UserInputError, match="multiple of"):
    dpo_settings(**{"dpo.max_steps": 5})
  with pytest.raises(UserInputError, match="config.dpo.rejected"):
    dpo_settings(**{"dpo.rejected": "middle"})
  settings = dpo_settings()
  assert list(settings.candidate_steps) == [0, 2, 4] and settings.seed == 0
  assert settings.train_settings.lora_scale == pytest.approx(16.0 / 2)


def test_dpo_profile_saved_and_reloaded_gives_the_same_answers(dpo_results, tiny_engine,
                                                               tmp_path):
  """The profile of a trained subject, through orbax and back, scores the test items as the
  protocol did (same context, same adapter), so chat and the evaluation agree."""
  result = next(r for r in dpo_results if r.trained)
  saved = profile_lib.profile_from_dpo(result, model_fingerprint=tiny_engine.fingerprint,
                                       model_source=tiny_engine.source, settings={"k": 1})
  path = profile_lib.save_profile(tmp_path / "profile", saved)
  profile = profile_lib.load_profile(path, model_fingerprint=tiny_engine.fingerprint,
                                     prompt_version=prompts.PROMPT_VERSION)
  assert profile.method == "dpo" and not profile.has_steering
  assert profile.settings["steps"] == result.chosen_steps
  assert profile.settings["decoding"] == result.chosen_decoding
  adapters = jax.tree.map(lambda x: np.asarray(x)[None], profile.adapters)
  scores, prior = tiny_engine.score([tiny_engine.context_tokens(profile.system_prompt)],
                                    HELDOUT, content_free=True, adapters=adapters)
  np.testing.assert_allclose(scores[0], result.test_log_probs, rtol=1e-6, atol=1e-6)
  predicted, _ = readout.decode(scores[0], profile.settings["decoding"], prior=prior[0],
                                match=(result.known_log_probs, result.known_answers))
  np.testing.assert_array_equal(predicted, result.predictions())
  with pytest.raises(UserInputError, match="not the loaded model"):
    profile_lib.load_profile(path, model_fingerprint="another-model")


def test_a_skipped_subject_has_a_profile_without_adapter(dpo_results, tmp_path):
  neutral = dpo_results[2]
  profile = profile_lib.profile_from_dpo(neutral, model_fingerprint="f", model_source="s",
                                         settings={})
  profile_lib.save_profile(tmp_path / "p", profile)
  loaded = profile_lib.load_profile(tmp_path / "p", model_fingerprint="f")
  assert loaded.adapters is None and loaded.steering() is None
  assert "no usable preference pairs" in loaded.settings["note"]
  assert loaded.settings["learning_rate"] is None and loaded.settings["steps"] == 0


def test_dpo_records(dpo_results):
  """Every decoding of the record reads the result's own predictions; "chosen" is the decoding
  chosen with the steps; a skipped subject's record carries its note."""
  subjects = three_subjects()
  for result, answers in zip(dpo_results, subjects.answers, strict=True):
    record = records.dpo_record(result, answers, profile="x")
    assert record["method"] == "dpo" and record["profile"] == "x"
    assert set(record["decodings"]) == {records.CHOSEN, *result.decodings}
    for d in result.decodings:
      assert record["decodings"][d]["predictions"] == result.predictions(d).tolist()
    chosen = record["decodings"][records.CHOSEN]
    assert chosen["decoding"] == result.chosen_decoding
    assert chosen["predictions"] == result.predictions().tolist()
    assert record["chosen_steps"] == result.chosen_steps
    assert record["num_pairs"] == result.num_pairs and record["trained"] == result.trained
    json.dumps(record, allow_nan=False)  # NaN (untried step counts) stored as null
  skipped = records.dpo_record(dpo_results[2], subjects.answers[2])
  assert "no usable preference pairs" in skipped["note"]
  assert skipped["chosen_learning_rate"] is None and skipped["fold_error"]["argmax"][0][1] is None
  assert "note" not in records.dpo_record(dpo_results[0], subjects.answers[0])
