"""N profiles x one questionnaire in one scoring program against the same work one profile at a
time (`launch.answer` / `api.answer`), on the embedded SmolLM2; then the planner's estimate for
1,000 profiles on Llama-3-8B on one H200.

    python benchmarks/bench_answer.py --sizes=1,8,32 --questionnaire=examples/weekend_habits.csv

Profiles are synthetic PAS profiles on the real model: PAPI subject i's few-shot context (its
120 known answers, ~1,400 tokens), steering on 24 random heads at alpha 2. Each size is run
once each way; compile time (JAX's compile events) is reported and subtracted.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from palign_jax import administer, api, data, planner, prompts, scoring  # noqa: E402
from palign_jax import questionnaire as questionnaire_lib  # noqa: E402
from palign_jax.protocol.profile import AlignmentProfile  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["1", "8", "32"], "Numbers of profiles.")
_QUESTIONNAIRE = flags.DEFINE_string("questionnaire", "examples/weekend_habits.csv",
                                     "The questionnaire CSV.")
_PLAN_PROFILES = flags.DEFINE_integer("plan_profiles", 1000, "Profiles in the planner estimate.")


def synthetic_profiles(engine, n: int) -> list[AlignmentProfile]:
  c, papi = engine.config, data.load_papi_subjects()
  known = data.known_answers(papi)
  out = []
  for i in range(n):
    rng = np.random.default_rng(i)
    mask = np.zeros(c.num_layers * c.num_heads, bool)
    mask[rng.choice(mask.size, 24, replace=False)] = True
    directions = rng.normal(size=(c.num_layers, c.num_heads, c.head_dim)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    out.append(AlignmentProfile(
        papi.ids[i], engine.fingerprint, engine.source, prompts.PROMPT_VERSION,
        prompts.few_shot_system_prompt(known[i]), 2.0, "kfold_known", known[i],
        mask.reshape(c.num_layers, c.num_heads), directions,
        np.ones((c.num_layers, c.num_heads), np.float32)))
  return out


def timed(fn):
  start = time.perf_counter()
  out = fn()
  end = time.perf_counter()
  return out, end - start, common.compile_seconds(start, end)


def main(argv):
  del argv
  common.track_compiles()
  engine = api.load_model("default")
  prepared = administer.prepare(engine.model.tokenizer,
                                questionnaire_lib.load(_QUESTIONNAIRE.value))
  sizes = [int(s) for s in _SIZES.value]
  profiles = synthetic_profiles(engine, max(sizes + [8]))  # --sizes= : the plan alone
  contexts = [len(administer.context_tokens(engine.model.tokenizer, prepared, p))
              for p in profiles]
  questions = [len(q) for q in prepared.questions]
  print(f"{len(questions)} items; contexts {min(contexts)}-{max(contexts)} tokens; "
        f"question_batch {engine.question_batch}")
  if sizes:
    administer.score(engine, profiles[:1], prepared, prefix_batch=1)  # compile 1-row programs
  print("| N | way | wall s | compile s | s/profile (no compile) | tokens/s | max abs diff |")
  print("|---|---|---|---|---|---|---|")
  for n in sizes:
    tokens, _ = planner.score_cost(engine.config, contexts[:n], questions, n,
                                   engine.question_batch)
    batched, wall_b, comp_b = timed(
        lambda n=n: administer.score(engine, profiles[:n], prepared, prefix_batch=n))
    serial, wall_s, comp_s = timed(lambda n=n: np.concatenate(
        [administer.score(engine, [p], prepared, prefix_batch=1) for p in profiles[:n]]))
    diff = float(np.abs(batched - serial).max())
    for way, wall, comp in (("one program", wall_b, comp_b), ("one at a time", wall_s, comp_s)):
      run = wall - comp
      print(f"| {n} | {way} | {wall:.1f} | {comp:.1f} | {run / n:.2f} | {tokens / run:.0f} | "
            f"{diff:.1e} |", flush=True)

  config = planner.PRESETS["llama3_8b"]
  peak, memory, _ = planner.DEVICES["H200"]
  budget = 0.5 * (memory * 2**30 - planner.param_bytes_per_device(config, 2, 1, 1, False))
  batch = scoring.auto_prefix_batch(config, scoring.bucket_length(max(contexts)),
                                    engine.question_batch,
                                    scoring.bucket_length(max(questions)), budget, 2)
  plan_contexts = [contexts[i % len(contexts)] for i in range(_PLAN_PROFILES.value)]
  plan = planner.estimate(config, [(plan_contexts, questions)], activation_lengths=[],
                          prefix_batch=batch, question_batch=engine.question_batch, devices=1,
                          peak_flops=peak * 1e12, throughput=planner.ACCELERATOR_THROUGHPUT)
  print(f"\nPlanner, {_PLAN_PROFILES.value} profiles x {len(questions)} items, Llama-3-8B "
        f"bfloat16, one H200, prefix batch {batch} (sized to memory): "
        f"{plan.flops / 1e15:.1f} PFLOP executed ({plan.useful_flops / 1e15:.1f} useful), "
        f"{plan.programs} programs; {plan.compute_seconds:.0f} s compute + "
        f"{plan.compile_seconds:.0f} s compiling = {plan.seconds:.0f} s "
        f"({plan.throughput.label}: {plan.throughput.efficiency:.0%} of peak, "
        f"{plan.throughput.compile_s:.0f} s per program)")


if __name__ == "__main__":
  app.run(main)
