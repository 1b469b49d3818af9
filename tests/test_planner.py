"""The planner: its FLOP count against XLA's own cost analysis, its useful FLOPs against a
token-by-token count, its plan of a run's programs against what scoring really compiles, P² in
the plan, throughput read from a device check, and `launch.plan` on good and bad input."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax import planner, scoring
from palign_jax.models import params as params_lib
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


def test_useful_flops_count_each_token_once_under_the_causal_mask():
  c = ONE_LAYER
  contexts, questions = [5, 9], [3, 4, 2]
  linear, attend = planner.layer_flops(c, 1, 0), planner.layer_flops(c, 1, 1) - \
      planner.layer_flops(c, 1, 0)
  expected = 0.0
  for context in contexts:  # token by token: position i sees keys 0..i
    expected += sum(linear + attend * (i + 1) for i in range(context))
    for q in questions:
      expected += sum(linear + attend * (context + j + 1) for j in range(q))
      expected += 2 * c.hidden_size * c.vocab_size  # the head at the question's last token
  assert planner.useful_score_flops(c, contexts, questions) == pytest.approx(expected)
  # The programs execute more: padded buckets and every key slot of a causal block.
  _, executed = planner.score_cost(c, contexts, questions, prefix_batch=2, question_batch=2)
  assert executed > expected
  assert planner.useful_capture_flops(c, [5]) == pytest.approx(
      sum(linear + attend * (i + 1) for i in range(5)))


def _lengths(subjects=4):
  rng = np.random.default_rng(0)
  return planner.PromptLengths(
      few_shot=rng.integers(1300, 1500, subjects), fold=rng.integers(900, 1000, (2, subjects)),
      heldout=rng.integers(60, 90, 180), known=rng.integers(60, 90, 120),
      content_free=np.array([20, 22, 25]), activations=rng.integers(30, 50, 240),
      description=rng.integers(300, 800, subjects), zero_shot=40)


def test_protocol_calls_price_zero_shot_and_p2():
  lengths = _lengths()
  heldout, cf = list(lengths.heldout), list(lengths.content_free)
  args = dict(subjects=4, subjects_per_batch=2, alphas=3, folds=2, oracle=False, honest=False)
  assert planner.protocol_calls(lengths, **args) == []
  p2 = planner.protocol_calls(lengths, **args, personality_prompt=True)
  assert p2 == [(list(lengths.description[:2]), heldout + cf),
                (list(lengths.description[2:]), heldout + cf)]
  zero = planner.protocol_calls(lengths, **args, zero_shot=True)
  assert zero == [([40], heldout + list(lengths.known) + cf)]
  # The estimate's time includes P²: adding it adds exactly its FLOPs at the efficiency.
  rate = planner.Throughput(efficiency=0.5, compile_s=0.0, label="assumed", source="test")
  pas = planner.protocol_calls(lengths, **dict(args, honest=True))
  plan = lambda calls: planner.estimate(
      ONE_LAYER, calls, activation_lengths=lengths.activations, prefix_batch=2,
      question_batch=10, devices=1, peak_flops=1e12, throughput=rate)
  p2_flops = sum(planner.score_cost(ONE_LAYER, ctx, q, 2, 10)[1] for ctx, q in p2)
  assert plan(pas + p2).compute_seconds - plan(pas).compute_seconds == pytest.approx(
      p2_flops / (1e12 * 0.5))
  with pytest.raises(ValueError, match="P²"):
    planner.protocol_calls(dataclasses.replace(lengths, description=np.array([], int)),
                           **args, personality_prompt=True)


def test_plan_states_useful_flops_and_mfu_on_them():
  lengths = _lengths()
  calls = planner.protocol_calls(lengths, subjects=4, subjects_per_batch=4, alphas=3, folds=2,
                                 oracle=True, honest=False)
  rate = planner.Throughput(efficiency=0.5, compile_s=3.0, label="assumed", source="test")
  plan = planner.estimate(ONE_LAYER, calls, activation_lengths=lengths.activations,
                          prefix_batch=4, question_batch=10, devices=2, peak_flops=1e12,
                          throughput=rate)
  useful = planner.useful_capture_flops(ONE_LAYER, lengths.activations) + sum(
      planner.useful_score_flops(ONE_LAYER, ctx, q) for ctx, q in calls)
  assert plan.useful_flops == pytest.approx(useful) and plan.useful_flops < plan.flops
  assert plan.compile_seconds == 3.0 * plan.programs
  assert plan.seconds == pytest.approx(plan.flops / (2 * 1e12 * 0.5) + plan.compile_seconds)
  assert plan.mfu(1e12) == pytest.approx(useful / (2 * 1e12 * plan.seconds))


def _device_check(kind="NVIDIA H200", **paper):
  """A device_check.json's fields the planner reads (benchmarks/device_check.py)."""
  stage = lambda name, flops, wall, compile_s, **more: {
      "status": "ok", "stage": name, "flops": flops, "wall_s": wall, "compile_s": compile_s,
      **more}
  return {"started": "2026-12-04 10:00:00 UTC", "preset": "llama3_8b", "dtype": "bfloat16",
          "stages": {
              "setup": {"status": "ok", "device_kind": kind, "peak_flops_per_device": 1e15,
                        "devices": 1},
              "activations": stage("activations", 2e14, 2.0, 1.0),
              "pas_paper": stage("pas_paper", 3e16, 80.0, 20.0, programs_compiled=4, **paper),
              "pas_honest": {"status": "failed", "error": "OOM"}}}


def test_measured_throughput_pools_the_device_checks_stages():
  kind, rate = planner.measured_throughput(_device_check())
  assert kind == "NVIDIA H200" and rate.label == "measured"
  # (2e14 + 3e16) FLOPs over (1 + 60) steady seconds on a 1e15 peak; 20 s over 4 programs.
  assert rate.efficiency == pytest.approx(3.02e16 / 61 / 1e15)
  assert rate.compile_s == pytest.approx(5.0)
  failed = _device_check()
  failed["stages"]["activations"]["status"] = failed["stages"]["pas_paper"]["status"] = "failed"
  with pytest.raises(ValueError, match="no completed"):
    planner.measured_throughput(failed)


def test_cudnn_attention_keeps_no_score_tensor():
  c = planner.PRESETS["llama3_8b"]
  shape = dict(dtype_bytes=2, data=1, model=1, fsdp=False, prefix_batch=4, context_length=1536,
               question_batch=10, question_length=96)
  einsum = planner.memory_per_device(c, **shape)
  cudnn = planner.memory_per_device(c, **shape, attention="cudnn")
  scores = 4 * 4 * c.num_heads * max(1536 * 1536, 10 * 96 * (1536 + 96))  # f32, 4 pairs
  assert einsum["total"] - cudnn["total"] == pytest.approx(scores)
  assert planner.attention_for("NVIDIA H200", "bfloat16") == "cudnn"
  assert planner.attention_for("NVIDIA H200", "float32") == "einsum"
  assert planner.attention_for("TPU v5p", "bfloat16") == "einsum"
  assert planner.attention_for("cpu", "bfloat16") == "einsum"


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
  assert "| useful FLOPs" in ok.stdout and "| P² (personality_prompt) |" in ok.stdout
  assert "| efficiency (executed FLOP/s / peak) | 40% (assumed) |" in ok.stdout
  too_big = _plan("--model=llama3_70b", "--subjects=10", "--device=A100",
                  "--config.dtype=bfloat16")
  assert too_big.returncode == 2
  last = too_big.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the model does not fit") and "--config.mesh.model=4" in last
  assert "Traceback" not in too_big.stderr
  bad_mesh = _plan("--model=llama3_8b", "--device=H100", "--devices=4", "--config.mesh.model=3")
  assert bad_mesh.returncode == 2 and "config.mesh" in bad_mesh.stderr


def test_plan_cli_uses_a_device_checks_measurement_for_its_kind_only(tmp_path):
  report = tmp_path / "device_check.json"
  report.write_text(json.dumps(_device_check()))
  args = ("--model=llama3_8b", "--subjects=8", "--config.dtype=bfloat16", f"--measured={report}")
  measured = _plan("--device=H200", *args)
  assert measured.returncode == 0, measured.stderr[-2000:]
  efficiency = planner.measured_throughput(_device_check())[1].efficiency
  assert f"| efficiency (executed FLOP/s / peak) | {efficiency:.0%} (measured) |" in \
      measured.stdout
  assert "| compile per program | 5.0 s (measured) |" in measured.stdout
  other_kind = _plan("--device=A100", *args)
  assert other_kind.returncode == 2 and "measured 'NVIDIA H200'" in other_kind.stderr


def test_pod_planning_knows_when_a_model_needs_several_hosts_and_what_crosses_them():
  llama70 = planner.PRESETS["llama3_70b"]
  total = sum(np.prod(s) for s in params_lib.param_shapes(llama70).values())
  assert total == pytest.approx(70.55e9, rel=0.01)  # Meta's published parameter count
  gib = 2**30
  assert not planner.needs_pod(llama70, 2, devices_per_host=8, device_memory=80 * gib)
  assert planner.needs_pod(llama70, 2, devices_per_host=4, device_memory=16 * gib)
  within = planner.tensor_parallel_traffic(llama70, 8, 8, rows=100, dtype_bytes=2)
  assert within == {"all_reduces": 2, "bytes_each": 100 * 8192 * 2, "cross_host": False}
  assert planner.tensor_parallel_traffic(llama70, 16, 8, 100, 2)["cross_host"]
  assert planner.tensor_parallel_traffic(llama70, 1, 8, 100, 2)["all_reduces"] == 0
