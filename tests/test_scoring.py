"""Prefix-shared scoring, activation capture and KV-cache generation against full forwards.

References: transformers' PyTorch model on each full prompt (scoring, generate), and repeated
full forwards of our own model (already checked against PyTorch in test_llama.py) where steering
is involved. Float32; tolerance 1e-5 relative unless stated.
"""

import contextlib
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_llama import (  # noqa: E402
    assert_close,
    build,
    o_proj_bias,
    torch_head_outputs,
    torch_logits,
)

from palign_jax import scoring  # noqa: E402
from palign_jax.errors import UserInputError  # noqa: E402

MODEL = "llama_gqa_tied"
QB, PB = 4, 2  # question and prefix batch sizes shared by most tests, to share compilations
OPTIONS = np.array([11, 23, 5, 42, 87], np.int32)  # stand-ins for the letters A..E


@functools.cache
def data(seed=0):
  """Three ragged prefixes (one length bucket) and seven ragged questions of random ids."""
  _, config, _ = build(MODEL)
  rng = np.random.default_rng(seed)
  prefixes = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (26, 30, 27)]
  questions = [rng.integers(0, config.vocab_size, n).astype(np.int32)
               for n in (5, 9, 3, 12, 7, 1, 10)]
  return prefixes, questions


def torch_scores(model, prompt):
  """Log-probabilities of the options under the full next-token distribution (float64)."""
  logits = torch_logits(model, prompt[None])[0, -1].astype(np.float64)
  top = logits.max()
  return logits[OPTIONS] - top - np.log(np.sum(np.exp(logits - top)))


def steering_for(config, lead, seed):
  shape = lead + (config.num_layers, config.num_heads, config.head_dim)
  return np.random.default_rng(seed).normal(0, 0.3, shape).astype(np.float32)


def test_bucket_length():
  assert [scoring.bucket_length(n) for n in (1, 8, 9, 45, 50, 60, 1500, 1545)] == [
      8, 8, 16, 48, 56, 64, 1536, 1664]
  for n in range(1, 5000, 7):
    assert n <= scoring.bucket_length(n) <= max(n + 7, n * 1.125)


def score(params, config, prefixes, questions, **kwargs):
  kwargs = {"question_batch": QB, "prefix_batch": PB, **kwargs}
  return scoring.score_contexts(params, config, prefixes, questions, OPTIONS, **kwargs)


def test_context_shared_scores_equal_full_prompts_in_torch():
  model, config, params = build(MODEL)
  prefixes, questions = data()
  got = score(params, config, prefixes, questions)
  assert got.shape == (3, 7, 5)
  ref = np.array([[torch_scores(model, np.concatenate([p, q])) for q in questions]
                  for p in prefixes])
  assert_close(got, ref)
  # Log-probabilities under the full vocabulary: the letters' total mass is below 1.
  assert (np.exp(got).sum(-1) < 1).all()
  # The baseline (one full forward per prompt) agrees too.
  full = scoring.score_full_prompts(params, config, [np.concatenate([prefixes[1], q])
                                                     for q in questions], OPTIONS, batch_size=QB)
  assert_close(full, ref[1])


def test_long_prefixes_encoded_in_halves_equal_torch():
  """Prefixes of PREFILL_SPLIT_MIN tokens or more are encoded in two halves; the cache must be
  the same as one pass (the scores equal PyTorch's on the full prompts)."""
  model, config, params = build(MODEL)
  rng = np.random.default_rng(3)
  n = scoring.PREFILL_SPLIT_MIN
  prefixes = [rng.integers(0, config.vocab_size, k).astype(np.int32) for k in (n + 9, n + 40)]
  _, questions = data()
  got = score(params, config, prefixes, questions[:3])
  assert scoring.bucket_length(len(prefixes[1])) >= n  # the split path ran
  ref = np.array([[torch_scores(model, np.concatenate([p, q])) for q in questions[:3]]
                  for p in prefixes])
  assert_close(got, ref)


@pytest.mark.parametrize("prefix_batch", [1, 3, 4, 8])
def test_any_prefix_batch_gives_the_same_scores(prefix_batch):
  _, config, params = build(MODEL)
  prefixes, questions = data()
  steering = jax.numpy.asarray(steering_for(config, (3, 2), seed=2))
  base = score(params, config, prefixes, questions, steering=steering)
  out = score(params, config, prefixes, questions, steering=steering, prefix_batch=prefix_batch)
  np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)


def test_scores_independent_of_padding_batching_and_order():
  _, config, params = build(MODEL)
  prefixes, questions = data()
  base = score(params, config, prefixes, questions)
  # One question per batch (an unshared cache path), all prefixes in one padded batch.
  out = score(params, config, prefixes, questions, question_batch=1, prefix_batch=4)
  np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)
  order = np.random.default_rng(1).permutation(len(questions))
  shuffled = score(params, config, prefixes[::-1], [questions[i] for i in order])
  np.testing.assert_allclose(shuffled, base[::-1][:, order], rtol=1e-5, atol=1e-6)
  # A longer question (another length bucket) changes nothing either.
  longer = score(params, config, prefixes, questions + [np.ones(20, int)])
  np.testing.assert_allclose(longer[:, :-1], base, rtol=1e-5, atol=1e-6)
  # Prebuilt question batches are the same as raw questions.
  built = scoring.QuestionBatches.build(questions, QB)
  np.testing.assert_array_equal(score(params, config, prefixes, built), base)


def test_steered_scoring_per_context_and_alpha():
  model, config, params = build(MODEL)
  prefixes, questions = data()
  steering = steering_for(config, (3, 2), seed=2)
  steering[:, 0] = 0.0  # alpha 0 must equal the unsteered scores
  on_device = jax.numpy.asarray(steering)
  got = score(params, config, prefixes, questions, steering=on_device)
  assert got.shape == (6, 7, 5)  # (context, alpha) pairs in order
  got = got.reshape(3, 2, 7, 5)
  plain = score(params, config, prefixes, questions)
  np.testing.assert_allclose(got[:, 0], plain, rtol=1e-5, atol=1e-6)
  for s in (0, 2):
    with o_proj_bias(model, steering[s, 1]):
      ref = [torch_scores(model, np.concatenate([prefixes[s], q])) for q in questions]
    assert_close(got[s, 1], np.array(ref))
  assert np.abs(got[:, 1] - got[:, 0]).max() > 1e-3
  # Any subset of pairs, in any order, gives the same rows.
  pairs = np.array([[2, 1], [0, 0], [1, 1]])
  subset = score(params, config, prefixes, questions, steering=on_device, pairs=pairs)
  np.testing.assert_allclose(subset, got[pairs[:, 0], pairs[:, 1]], rtol=1e-5, atol=1e-6)


def test_batch_rows_and_memory_sizing():
  assert scoring._batch_rows(10, 4) == [4, 4, 2]
  assert scoring._batch_rows(7, 4) == [4, 2, 1]
  assert scoring._batch_rows(6, 8) == [4, 2]
  assert scoring._batch_rows(1, 8) == [1]
  for count in range(1, 40):
    assert sum(scoring._batch_rows(count, 8)) == count
  _, config, _ = build(MODEL)
  small = scoring.auto_prefix_batch(config, 1536, 20, 88, budget_bytes=1e6)
  large = scoring.auto_prefix_batch(config, 1536, 20, 88, budget_bytes=1e9)
  assert small == 1 and large > small and large & (large - 1) == 0 and large <= 64


def test_capture_head_outputs_at_last_token():
  model, config, params = build(MODEL)
  prefixes, questions = data()
  seqs = list(prefixes) + list(questions)
  delta = steering_for(config, (), seed=4)
  # Unsteered: several length-sorted batches; steered: one batch.
  for steering, batch_size in ((None, QB), (delta, len(seqs))):
    got = scoring.capture_head_outputs(params, config, seqs, steering=steering,
                                       batch_size=batch_size)
    assert got.shape == (len(seqs), config.num_layers, config.num_heads, config.head_dim)
    for i, s in enumerate(seqs):
      if steering is None:
        ref = torch_head_outputs(model, s[None])[0, :, -1]  # [layers, heads * head_dim]
      else:  # torch steered by o_proj bias; our capture is the o_proj input, steering included
        with o_proj_bias(model, steering):
          ref = torch_head_outputs(model, s[None])[0, :, -1]
        ref = ref + steering.reshape(config.num_layers, -1)
      assert_close(got[i], ref.reshape(got.shape[1:]))


def torch_greedy(model, prompt, n, steering=None):
  """Greedy decoding by repeated full forwards (no cache) in PyTorch."""
  seq = list(prompt)
  with contextlib.ExitStack() as stack:
    if steering is not None:
      stack.enter_context(o_proj_bias(model, steering))
    for _ in range(n):
      seq.append(int(np.argmax(torch_logits(model, np.array([seq]))[0, -1])))
  return np.array(seq[len(prompt):])


def generation_prompts():
  prefixes, _ = data()
  return [prefixes[0], prefixes[2][:5]]  # ragged: left padding and per-row positions


def test_greedy_generation_equals_full_forwards_and_transformers_generate():
  model, config, params = build(MODEL)
  prompts = generation_prompts()
  delta = steering_for(config, (), seed=3)
  for steering in (None, delta):
    got = scoring.generate(params, config, prompts, 6, steering=steering)
    for prompt, out in zip(prompts, got, strict=True):
      np.testing.assert_array_equal(out, torch_greedy(model, prompt, 6, steering))
      if steering is None:
        ids = torch.from_numpy(prompt[None].astype(np.int64))
        with torch.no_grad():
          ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        np.testing.assert_array_equal(out, ref[0, len(prompt):].numpy())
  # eos stops a row (and includes the eos token).
  first = scoring.generate(params, config, prompts, 6)[0]
  stop = int(first[2])
  stopped = scoring.generate(params, config, prompts, 6, eos_ids=[stop])[0]
  np.testing.assert_array_equal(stopped, first[:list(first).index(stop) + 1])


def test_sampling_is_seeded():
  _, config, params = build(MODEL)
  prompts = generation_prompts()
  a = scoring.generate(params, config, prompts, 6, temperature=1.0, seed=7)
  b = scoring.generate(params, config, prompts, 6, temperature=1.0, seed=7)
  c = scoring.generate(params, config, prompts, 6, temperature=1.0, seed=8)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
  cold = scoring.generate(params, config, prompts, 6, temperature=1e-4, seed=7)
  for x, y in zip(cold, scoring.generate(params, config, prompts, 6), strict=True):
    np.testing.assert_array_equal(x, y)


def test_bad_inputs_raise_user_errors():
  _, config, params = build(MODEL)
  prefixes, questions = data()
  with pytest.raises(UserInputError, match=r"questions\[1\].*outside the vocabulary"):
    score(params, config, prefixes, [questions[0], np.array([999])])
  with pytest.raises(UserInputError, match="steering has shape"):
    score(params, config, prefixes, questions,
          steering=np.zeros((2, 1, config.num_layers, 1, 1)))
  with pytest.raises(UserInputError, match="pairs must index"):
    score(params, config, prefixes, questions, pairs=np.array([[3, 0]]))
  with pytest.raises(UserInputError, match=r"prompts\[0\]"):
    scoring.generate(params, config, [np.array([], np.int32)], 3)
