"""Side by side: the sweep's two programs at this tree against a baseline commit, interleaved.

The 2-core box's speed drifts by up to 2x within minutes (the matmul peak read at the start and
the end of one run differs by 15-25%), so two benchmarks run one after the other compare the
host, not the code. This script checks out `--baseline` into a temporary git worktree and, in
alternating rounds (baseline, this tree, baseline, ...), runs in a fresh process each:

* one context encode (`scoring.encode_prefixes`, the real SmolLM2, a 1,408-token few-shot
  context of the fixed subject) and `--batches` question batches scored on its cache
  (`scoring.score_on_prefixes`, the sweep's inner loop), median steady seconds of each;
* the 2048^3 float32 matmul peak right before and right after.

It prints one row per round and the medians per tree with the ratio (this tree / baseline).
FLOPs are the planner's executed count for those shapes (the same for both trees).

    python benchmarks/bench_ab.py --baseline=50af5bb --rounds=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def sweep_programs() -> dict[str, tuple]:
  """`{"encode": (fn, args), "score": (fn, args)}`: the sweep's two jitted programs on the real
  SmolLM2, built from the tree in the working directory (its `palign_jax`, not this file's):
  one 1,408-token few-shot context of the fixed subject, and one question batch on its cache."""
  sys.path.insert(0, os.getcwd())
  import jax.numpy as jnp

  from configs import default
  from palign_jax import data, prompts, scoring
  from palign_jax import engine as engine_lib

  eng = engine_lib.Engine.from_config(default.get_config())
  c = eng.config
  papi = data.load_papi_subjects()
  known = data.known_answers(papi.select([papi.ids[0]]))[0]
  context = eng.context_tokens(prompts.few_shot_system_prompt(known))
  questions = eng.questions(data.load_split().heldout)
  params = eng.model.params
  tokens, lengths = scoring._pad([context], scoring.bucket_length(len(context)))
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  steering = jnp.zeros((1, c.num_layers, c.num_heads, c.head_dim))
  cache = scoring.encode_prefixes(params, c, tokens, lengths, steering)
  return {
      "encode": (scoring.encode_prefixes, (params, c, tokens, lengths, steering)),
      "score": (scoring.score_on_prefixes, (params, c, cache, lengths, questions.tokens[0],
                                            questions.lengths[0], jnp.asarray(eng.option_ids),
                                            steering)),
      "question_batches": (questions.tokens, questions.lengths)}


def _matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """`planner.matmul_peak` for baselines older than the planner (before 2026-11-29 09:00)."""
  import time

  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(lambda x: x @ x)
  dot(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def child(batches: int) -> dict:
  """Runs inside one tree (the working directory): times encode and score there."""
  import time

  import jax

  try:
    from palign_jax.planner import matmul_peak
  except ImportError:
    matmul_peak = _matmul_peak

  programs = sweep_programs()
  encode_fn, encode_args = programs["encode"]
  score_fn, score_args = programs["score"]
  question_tokens, question_lengths = programs["question_batches"]

  def encode():
    return jax.block_until_ready(encode_fn(*encode_args))

  def score(b):
    b %= len(question_tokens)
    return jax.block_until_ready(score_fn(*score_args[:4], question_tokens[b],
                                          question_lengths[b], *score_args[6:]))

  score(0)

  def seconds(fn, n):
    out = []
    for i in range(n):
      start = time.perf_counter()
      fn(i)
      out.append(time.perf_counter() - start)
    return statistics.median(out)

  peak_before = matmul_peak()
  score_s = seconds(score, batches)
  encode_s = seconds(lambda _: encode(), 3)
  peak_after = matmul_peak()
  return {"score_s": score_s, "encode_s": encode_s, "peaks": [peak_before, peak_after],
          "bucket": int(encode_args[2].shape[1]),
          "question_shape": list(question_tokens[0].shape)}


def executed_flops(result: dict) -> tuple[float, float]:
  """(encode, one question batch) executed FLOPs, from this tree's planner."""
  sys.path.insert(0, ROOT)
  from palign_jax import planner
  from palign_jax.models import loading

  c = loading.load_model("default").config
  rows, length = result["question_shape"]
  bucket = result["bucket"]
  score = planner.layer_flops(c, rows * length, bucket + length) + (
      2 * c.hidden_size * c.vocab_size * rows)
  return planner.encode_flops(c, bucket), score


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline", default="HEAD~1",
                      help="the commit compared against (checked out into a temporary worktree)")
  parser.add_argument("--rounds", type=int, default=2,
                      help="rounds per tree, alternating baseline / this tree")
  parser.add_argument("--batches", type=int, default=12,
                      help="question batches timed per round (median taken)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.batches)))
    return

  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                        capture_output=True, text=True).stdout.strip()
  base = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                        capture_output=True, text=True).stdout.strip()
  worktree = tempfile.mkdtemp(prefix="bench_ab_")
  subprocess.run(["git", "worktree", "add", "--detach", "--force", worktree, base], cwd=ROOT,
                 check=True, capture_output=True)
  rows = []
  try:
    for round_ in range(args.rounds):
      for label, tree in ((f"baseline {base}", worktree), (f"this tree ({head}+)", ROOT)):
        print(f"round {round_ + 1}: {label} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                              f"--batches={args.batches}"], cwd=tree, check=True,
                             capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=tree)).stdout
        rows.append((round_ + 1, label, json.loads(out.strip().splitlines()[-1])))
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=ROOT,
                   capture_output=True)

  encode_flops, score_flops = executed_flops(rows[0][2])
  print(f"# bench_ab: SmolLM2-135M-Instruct float32, {os.cpu_count()} CPUs; encode of a "
        f"{rows[0][2]['bucket']}-token context ({encode_flops / 1e9:.0f} GFLOP executed), "
        f"question batch {rows[0][2]['question_shape']} on its cache ({score_flops / 1e9:.0f}"
        " GFLOP)")
  print("| round | tree | score s | score GFLOP/s | encode s | encode GFLOP/s | matmul peak "
        "before / after GFLOP/s | score util (of the higher peak) |")
  print("|---|---|---|---|---|---|---|---|")
  for round_, label, r in rows:
    peak = max(r["peaks"])
    print(f"| {round_} | {label} | {r['score_s']:.2f} | {score_flops / r['score_s'] / 1e9:.0f} | "
          f"{r['encode_s']:.2f} | {encode_flops / r['encode_s'] / 1e9:.0f} | "
          f"{r['peaks'][0] / 1e9:.0f} / {r['peaks'][1] / 1e9:.0f} | "
          f"{score_flops / r['score_s'] / peak:.0%} |")
  medians = {}
  for label in dict.fromkeys(label for _, label, _ in rows):
    mine = [r for _, lab, r in rows if lab == label]
    medians[label] = (statistics.median(r["score_s"] for r in mine),
                      statistics.median(r["encode_s"] for r in mine))
  (base_label, (bs, be)), (head_label, (hs, he)) = medians.items()
  print(f"\nmedian score s: {base_label} {bs:.2f}, {head_label} {hs:.2f} "
        f"(ratio this / baseline {hs / bs:.2f}); median encode s: {be:.2f} vs {he:.2f} "
        f"(ratio {he / be:.2f})")


if __name__ == "__main__":
  main()
