"""The planner: its FLOP count against XLA's own cost analysis, its plan of a run's programs
against what scoring really compiles, and `launch.plan` on bad input."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax import planner, scoring
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import Llama

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

# One layer: XLA's cost analysis counts a scanned layer loop's body once.
ONE_LAYER = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=1,
                        num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)


def _zero_params(config):
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Llama(config, jnp.float32).init(
      jax.random.PRNGKey(0), tokens, jnp.broadcast_to(jnp.arange(4), (1, 4)))["params"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_question_scoring_flops_match_xla_cost_analysis():
  c, params = ONE_LAYER, _zero_params(ONE_LAYER)
  prefixes, context, questions, length = 2, 512, 10, 64
  cache = scoring.encode_prefixes(params, c, jnp.zeros((prefixes, context), jnp.int32),
                                  jnp.full((prefixes,), context, jnp.int32))
  compiled = scoring.score_on_prefixes.lower(
      params, c, cache, jnp.full((prefixes,), context, jnp.int32),
      jnp.zeros((questions, length), jnp.int32), jnp.full((questions,), length, jnp.int32),
      jnp.arange(5)).compile()
  analysis = compiled.cost_analysis()
  xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  # score_cost's inner term for one batch: question rows attending to context + themselves,
  # then the full-vocabulary head at each question's last token.
  planned = prefixes * (planner.layer_flops(c, questions * length, context + length)
                        + 2 * c.hidden_size * c.vocab_size * questions)
  # XLA also counts elementwise work (norms, softmax, RoPE), a few percent here.
  assert 1.0 <= xla / planned < 1.05


def test_score_cost_sums_its_batches():
  c = ONE_LAYER
  contexts, questions = [300, 310, 700], [60, 64, 70, 90]
  tokens, flops = planner.score_cost(c, contexts, questions, prefix_batch=2, question_batch=2)
  assert tokens == sum(contexts) + len(contexts) * sum(questions)
  expected = 0.0
  for chosen, bucket in scoring.plan_prefix_batches(contexts, 2):
    expected += len(chosen) * planner.encode_flops(c, bucket)
    for chunk in ([60, 64], [70, 90]):
      t = scoring.bucket_length(max(chunk))
      expected += len(chosen) * (planner.layer_flops(c, 2 * t, bucket + t)
                                 + 2 * c.hidden_size * c.vocab_size * 2)
  assert flops == pytest.approx(expected)


def test_planned_programs_are_the_programs_scoring_compiles():
  """`program_shapes` (what the planner counts) == the shapes `score_contexts` compiles."""
  c = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
  params = _zero_params(c)
  rng = np.random.default_rng(0)
  contexts = [rng.integers(0, 64, n) for n in (40, 45, 130, 300, 310)]
  questions = [rng.integers(0, 64, n) for n in (7, 9, 20, 33, 34, 35, 70)]
  before = scoring.compiled_programs()
  scoring.score_contexts(params, c, contexts, questions, [1, 2, 3, 4, 5], question_batch=3,
                         prefix_batch=2)
  after = scoring.compiled_programs()
  compiled = sum(after[k] - before[k] for k in ("encode_prefixes", "score_on_prefixes"))
  planned = scoring.program_shapes([len(x) for x in contexts], [len(q) for q in questions],
                                   prefix_batch=2, question_batch=3)
  assert compiled == len(planned)


def _plan(*args):
  return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_plan_cli_prints_a_plan_and_refuses_what_does_not_fit():
  ok = _plan("--model=llama3_8b", "--subjects=300", "--device=H200", "--config.dtype=bfloat16")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "estimated time" in ok.stdout and "fits: yes" in ok.stdout
  too_big = _plan("--model=llama3_70b", "--subjects=10", "--device=A100",
                  "--config.dtype=bfloat16")
  assert too_big.returncode == 2
  last = too_big.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the model does not fit") and "--config.mesh.model=4" in last
  assert "Traceback" not in too_big.stderr
  bad_mesh = _plan("--model=llama3_8b", "--device=H100", "--devices=4", "--config.mesh.model=3")
  assert bad_mesh.returncode == 2 and "config.mesh" in bad_mesh.stderr
