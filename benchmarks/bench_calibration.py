"""Benchmark: what contextual calibration's content-free questions add to a PAS sweep.

The `calibrated` readouts need the model's letter prior under each (subject, alpha) context,
measured on three content-free questions scored in the same call as the real ones (one more
question batch per context). This times `Engine.score` on the real SmolLM2 for one subject's
few-shot context at every alpha (zero steering: the cost does not depend on it), on a fold's
40 known items and on the 180 held-out items, with and without the content-free batch,
interleaved, and prints the extra time as a fraction of the sweep, beside the FLOP count of
both (`planner.score_cost`).

  python benchmarks/bench_calibration.py               # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import default  # noqa: E402
from palign_jax import data, planner, prompts  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=2, help="timed runs of each case")
  parser.add_argument("--alphas", type=int, default=6, help="(subject, alpha) contexts")
  args = parser.parse_args(argv)
  config = default.get_config()
  engine = engine_lib.Engine.from_config(config)
  subjects = data.parse_subject_spec("0:1", data.load_papi_subjects())
  context = engine.context_tokens(prompts.few_shot_system_prompt(data.known_answers(subjects)[0]))
  c = engine.config
  steering = jnp.zeros((1, args.alphas, c.num_layers, c.num_heads, c.head_dim), jnp.float32)
  split = data.load_split()
  cases = {"fold (40 known items)": split.known[:40], "test (180 held-out items)": split.heldout}
  print(f"# SmolLM2-135M-Instruct float32, 1 subject x {args.alphas} alphas, question batch "
        f"{engine.question_batch}; load {os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  print("| sweep | without s | with content-free s | extra time | extra FLOPs |")
  print("|---|---|---|---|---|")
  for name, items in cases.items():
    for content_free in (False, True):  # compile both first
      engine.score([context], items, steering=steering, content_free=content_free)
    times = {False: [], True: []}
    for _ in range(args.repeats):
      for content_free in (False, True):
        start = time.perf_counter()
        engine.score([context], items, steering=steering, content_free=content_free)
        times[content_free].append(time.perf_counter() - start)
    lengths = [len(context)] * args.alphas
    questions = [len(q) for q in engine.question_tokens(items)]
    cf = [len(q) for q in engine._content_free]
    prefix = engine.prefix_batch(len(context))
    _, flops = planner.score_cost(c, lengths, questions, prefix, engine.question_batch)
    _, flops_cf = planner.score_cost(c, lengths, questions + cf, prefix, engine.question_batch)
    base, more = np.median(times[False]), np.median(times[True])
    print(f"| {name} | {base:.1f} | {more:.1f} | {more / base - 1:+.1%} | "
          f"{flops_cf / flops - 1:+.1%} |")
  print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
