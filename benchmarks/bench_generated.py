"""Benchmark: the paper's generated readout against the letter readout, on the real SmolLM2.

The library reads each answer from the next-token distribution over the letters A..E
(`Engine.score`); the reference generates up to 15 tokens greedily and parses the option from
the text (`palign_jax.generated`). This times both on one PAPI subject's few-shot context and
N held-out items, each compiled first and then timed (median of the repeats, interleaved), and
prints seconds, computed tokens per second (the context once, the questions, and the generated
tokens), the ratio to the letter readout, how often the generated answer equals the argmax
letter, and how many replies could not be parsed. Generation runs twice: stopping a batch as
soon as every row's option is settled (the default), and always generating all 15 tokens.
With --naive-rows, also `scoring.generate` on whole prompts (context + question, no prefix
sharing, as the reference does) for that many rows, once, extrapolated to N items.

  python benchmarks/bench_generated.py                  # ~5 min on 2 CPU cores
  python benchmarks/bench_generated.py --naive-rows 10  # + ~3 min
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import default  # noqa: E402
from palign_jax import data, generated, prompts, readout, scoring  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--items", type=int, default=30, help="held-out items asked")
  parser.add_argument("--subject", type=int, default=0, help="0-based PAPI subject")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs of each readout")
  parser.add_argument("--batch-rows", type=int, default=0,
                      help="rows per generation call (0: the engine's question batch)")
  parser.add_argument("--naive-rows", type=int, default=0,
                      help="also time whole-prompt generation on this many rows (0: no)")
  args = parser.parse_args(argv)
  config = default.get_config()
  engine = engine_lib.Engine.from_config(config)
  subjects = data.parse_subject_spec(f"{args.subject}:{args.subject + 1}",
                                     data.load_papi_subjects())
  context = engine.context_tokens(prompts.few_shot_system_prompt(data.known_answers(subjects)[0]))
  items = data.load_split().heldout[:args.items]
  batch_rows = args.batch_rows or engine.question_batch
  questions = sum(len(q) for q in engine.question_tokens(items))

  def letter():
    return engine.score([context], items)

  def generate(chunk):
    return lambda: generated.generate_answers(engine, [context], items, batch_rows=batch_rows,
                                              chunk_tokens=chunk)

  cases = {"letter (Engine.score)": letter,
           "generated, early stop": generate(1),
           "generated, all 15 tokens": generate(generated.REFERENCE_MAX_NEW_TOKENS)}
  print(f"# SmolLM2-135M-Instruct {engine.params_dtype}, subject {args.subject}: "
        f"{len(context)}-token context, {len(items)} held-out items ({questions} question "
        f"tokens), question batch {engine.question_batch}, generation rows per call "
        f"{batch_rows}; load {os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  first, outputs = {}, {}
  for name, run in cases.items():  # compile (first call) and keep the outputs
    start = time.perf_counter()
    outputs[name] = run()
    first[name] = time.perf_counter() - start
  times = collections.defaultdict(list)
  for _ in range(args.repeats):
    for name, run in cases.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  log_probs = outputs["letter (Engine.score)"][0]
  base = float(np.median(times["letter (Engine.score)"]))
  print("| readout | first call s | s | generated tokens | computed tok/s | time / letter | "
        "agrees with argmax letter | unparsable |")
  print("|---|---|---|---|---|---|---|---|")
  for name in cases:
    seconds = float(np.median(times[name]))
    if name.startswith("letter"):
      computed, new, agree, unparsable = len(context) + questions, "-", "-", "-"
    else:
      out = outputs[name]
      computed, new = out.prompt_tokens + out.generated_tokens, out.generated_tokens
      stats = generated.agreement(out.answers[0], log_probs)
      agree = f"{stats['agree']}/{stats['rows']} ({stats['agreement']:.0%})"
      unparsable = stats["unparsable"]
    print(f"| {name} | {first[name]:.1f} | {seconds:.2f} | {new} | {computed / seconds:,.0f} | "
          f"{seconds / base:.2f}x | {agree} | {unparsable} |")
  if args.naive_rows:
    rows = [np.concatenate([context, q]) for q in engine.question_tokens(items)[:args.naive_rows]]
    eos = [engine.model.tokenizer.eos_token_id]
    start = time.perf_counter()
    replies = scoring.generate(engine.model.params, engine.config, rows,
                               generated.REFERENCE_MAX_NEW_TOKENS, eos_ids=eos)
    seconds = (time.perf_counter() - start) * len(items) / len(rows)
    new = sum(map(len, replies))
    computed = (sum(map(len, rows)) + new) * len(items) / len(rows)
    print(f"| whole prompts (scoring.generate), {len(rows)} rows, first call, x{len(items)}/"
          f"{len(rows)} | - | {seconds:.2f} | {new} | {computed / seconds:,.0f} | "
          f"{seconds / base:.2f}x | - | - |")
  out = outputs["generated, all 15 tokens"]
  letters = readout.answers(log_probs, "argmax")
  print(f"# argmax letter answers: {np.bincount(letters.ravel(), minlength=6)[1:].tolist()} "
        f"(counts of 1..5); generated: {np.bincount(out.answers[0], minlength=6).tolist()} "
        "(counts of 0..5)")
  for text in sorted(set(out.texts[0]), key=out.texts[0].count, reverse=True)[:5]:
    print(f"# {out.texts[0].count(text)} x {prompts.ANSWER_PREFILL + text!r}")
  print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
