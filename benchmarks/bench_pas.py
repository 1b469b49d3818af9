"""Benchmark: PAS per subject on the real SmolLM2, as `launch.evaluate` runs it, against the
reference's way measured side by side.

What runs (one process, the model loaded once; JAX compile time is read from JAX's own compile
events and reported apart from the steady time):

1. The shared activations (240 forwards over the 120 known items), computed, not read from disk.
2. The fixed comparison case: subject 172481, 30 held-out items (the first six per trait, IPIP
   numbers in `FIXED_ITEMS`), alphas 0 and 4, the oracle sweep only (probes fitted once and not
   timed). It runs twice, before and after the reference, so the two are interleaved.
3. The reference's way on the same case (`benchmarks/reference_torch.py`, PyTorch +
   transformers: every prompt re-encoded, 15 tokens generated per answer), in a subprocess.
4. For each count in --subjects (PAPI subjects 1..S, one batch each, measured): the paper's
   protocol (`oracle_test`: every alpha on the 180 held-out items) and the honest protocol
   (`kfold_known`: k folds x every alpha on the known items, then alpha 0 and the chosen alphas
   on the held-out items), through `protocol.alignment.align_subjects`.
5. Counts in --extrapolate: the exact FLOPs of their plan divided by the steady FLOP rate
   measured in 4 (labelled EXTRAPOLATED), and the compiled programs a run would need.
6. --profile: where the time of one context encode and one question batch goes, from a JAX
   profiler trace, by kind of operation (matmuls, attention softmax, the rest).

FLOPs are those the programs execute: matmuls (2 m n k) and attention over every key slot,
padding and the masked half of the context's causal attention included; elementwise work and
probe fitting are not counted. Utilisation is steady FLOP/s over the best 2048^3 float32
`jnp.dot` measured at the start and end of the run. The 1-minute load average is printed: the
numbers mean something only on a quiet machine.

  python benchmarks/bench_pas.py                               # 1 and 8 subjects, ~1.5 h on 2 cores
  python benchmarks/bench_pas.py --subjects=1 --extrapolate=8,32,300 --reference=none
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import (  # noqa: E402  (same directory)
    ScoreLog,
    stage,
    steady,
    track_compiles,
)

from configs import default  # noqa: E402
from palign_jax import data, planner, prompts, scoring  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402
from palign_jax.pas import fit as pas_fit  # noqa: E402
from palign_jax.protocol import alignment  # noqa: E402

FIXED_SUBJECT = "172481"
FIXED_ITEMS = (9, 10, 14, 15, 16, 19, 20, 21, 23, 24, 25, 30, 32, 38, 39, 44, 46, 48, 51, 60, 66,
               67, 72, 73, 78, 81, 82, 83, 87, 92)
FIXED_ALPHAS = (0.0, 4.0)
# The reference pipeline measured by the project's outside check on this machine class
# (issue 8): 213-215 s per alpha on the fixed case; 426-430 s for both alphas.
REFERENCE_FIXED_CASE_S = (426.0, 430.0)
# The paper's protocol for one subject by the same measurement, linear in items:
# 214 s per alpha x 6 alphas x 180 / 30 items.
REFERENCE_PAPER_PROTOCOL_S = 214.0 * 6 * 180 / 30
HERE = os.path.dirname(os.path.abspath(__file__))


# --- the runs ---------------------------------------------------------------------------------

def run_config(args):
  config = default.get_config()
  config.scoring.prefix_batch = args.prefix_batch
  config.scoring.question_batch = args.question_batch
  return config


def fixed_case(engine, activations, settings) -> dict:
  """The oracle sweep of the fixed comparison case (probes fitted before the clock starts)."""
  subjects = data.load_papi_subjects().select([FIXED_SUBJECT])
  items = np.array([n - 1 for n in FIXED_ITEMS])
  known = data.known_answers(subjects).astype(np.int32)
  fit = pas_fit.fit_pas(activations, known, settings.fit, key=jax.random.PRNGKey(0),
                        subject_ids=alignment.subject_seeds(subjects.ids))
  steering = jax.block_until_ready(pas_fit.steering_vectors(fit, FIXED_ALPHAS))
  start = time.perf_counter()
  contexts = [engine.context_tokens(prompts.few_shot_system_prompt(known[0]))]
  log_probs = engine.score(contexts, items, steering=steering)
  end = time.perf_counter()
  totals = engine.score.totals(start, end)
  return {"stage": stage(f"fixed case: {len(FIXED_ALPHAS)} alphas x {len(items)} items",
                         start, end, tokens=totals["tokens"], flops=totals["flops"]),
          "letters": ["ABCDE"[i] for i in np.argmax(log_probs, -1).ravel()]}


def protocol_run(engine, activations, settings, count: int, protocol: str) -> dict:
  papi = data.load_papi_subjects()
  subjects = papi.select(list(papi.ids[:count]))
  selection = {"oracle": "oracle_test", "honest": "kfold_known"}[protocol]
  start = time.perf_counter()
  results = alignment.align_subjects(engine, activations, subjects, settings,
                                     selections=(selection,))
  end = time.perf_counter()
  totals = engine.score.totals(start, end)
  work = results[0].work
  label = ("paper protocol (oracle): 6 alphas x 180 items" if protocol == "oracle" else
           f"honest: {work['folds']} folds x 6 alphas x 40 items + chosen alphas x 180 items")
  return {"stage": stage(f"S={count} {label}", start, end, tokens=totals["tokens"],
                         flops=totals["flops"], subjects=count,
                         note=f"{totals['pairs']} (subject, alpha) contexts"),
          "stage_seconds": work["stage_seconds"],
          "alphas": {r.subject_id: r.chosen_alpha for r in results}}


def plan_cost(engine, count: int, protocol: str, settings) -> tuple[float, set]:
  """Executed FLOPs and program shapes of a `count`-subject run (subjects_per_batch batches),
  from the plan alone. The honest test sweep is planned with 2 alphas per subject (0 and one
  chosen; a third when the decodings choose differently)."""
  config = engine.config
  papi = data.load_papi_subjects()
  subjects = papi.select(list(papi.ids[:count]))
  known = data.known_answers(subjects)
  split = data.load_split()
  batch = int(default.get_config().subjects_per_batch)
  heldout_q = [len(q) for q in engine.question_tokens(split.heldout)]
  flops, shapes = 0.0, set()

  def add(contexts_per_pair, question_lengths):
    nonlocal flops
    prefix_batch = engine.prefix_batch(max(contexts_per_pair))
    flops += planner.score_cost(config, contexts_per_pair, question_lengths, prefix_batch,
                        engine.question_batch)[1]
    shapes.update(scoring.program_shapes(contexts_per_pair, question_lengths, prefix_batch,
                                         engine.question_batch))

  lengths = np.array([len(engine.context_tokens(prompts.few_shot_system_prompt(k)))
                      for k in known])
  folds = alignment.fold_of_known_items(settings.folds, settings.seed)
  fold_lengths = {}
  if protocol == "honest":
    for f in range(settings.folds):
      visible = np.where((folds == f)[None], 0, known)
      fold_lengths[f] = np.array([len(engine.context_tokens(prompts.few_shot_system_prompt(k)))
                                  for k in visible])
  n_alphas = len(settings.alphas)
  for start in range(0, count, batch):
    rows = slice(start, min(start + batch, count))
    if protocol == "oracle":
      add(list(np.repeat(lengths[rows], n_alphas)), heldout_q)
      continue
    for f in range(settings.folds):
      add(list(np.repeat(fold_lengths[f][rows], n_alphas)),
          [len(q) for q in engine.question_tokens(split.known[folds == f])])
    add(list(np.repeat(lengths[rows], 2)), heldout_q)
  return flops, shapes


# --- the profile ------------------------------------------------------------------------------

def _categories(hlo_text: str) -> dict[str, str]:
  """Fusion/op name -> kind of operation (matmul, softmax, reduction...), from optimised HLO."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip())
    if header:
      current = header.group(1)
      bodies[current] = []
    elif current:
      bodies[current].append(line)
  kinds = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? (fusion|dot|custom-call)\(", line)
    if not m:
      continue
    name, op = m.group(1), m.group(2)
    called = re.search(r"calls=%([\w.\-]+)", line)
    called = called.group(1) if called else None
    body = "\n".join(bodies.get(called or "", [])) if called else line
    matmul = op == "dot" or " dot(" in body or "convolution(" in body
    if matmul and "exponential(" in body:
      kinds[name] = "attention: softmax fused with its matmul"
    elif matmul:
      kinds[name] = "matmul"
    elif "exponential(" in body:
      kinds[name] = "softmax (exp)"
    elif " reduce(" in body or op == "reduce":
      kinds[name] = "reduction"
    else:
      kinds[name] = "other"
  return kinds


def profile_programs(engine) -> dict[str, list]:
  """Seconds by kind of operation ("kinds": (kind, seconds, share)) and the slowest operations
  ("top": (program, op, kind, seconds, output shape)) for one context encode and one question
  batch at prefix batch 1."""
  c = engine.config
  papi = data.load_papi_subjects()
  known = data.known_answers(papi.select([FIXED_SUBJECT]))[0]
  context = engine.context_tokens(prompts.few_shot_system_prompt(known))
  batches = engine.questions(data.load_split().heldout)
  params = engine.model.params
  tokens, lengths = scoring._pad([context], scoring.bucket_length(len(context)))
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  steering = jnp.zeros((1, c.num_layers, c.num_heads, c.head_dim))
  option_ids = jnp.asarray(engine.option_ids)
  encode = lambda: scoring.encode_prefixes(params, c, tokens, lengths, steering)
  cache = jax.block_until_ready(encode())
  score = lambda: scoring.score_on_prefixes(params, c, cache, lengths, batches.tokens[0],
                                            batches.lengths[0], option_ids, steering)
  jax.block_until_ready(score())
  programs = {
      "encode": (scoring.encode_prefixes, (params, c, tokens, lengths, steering), encode),
      "score": (scoring.score_on_prefixes, (params, c, cache, lengths, batches.tokens[0],
                                            batches.lengths[0], option_ids, steering), score)}
  seconds, by_op = collections.Counter(), collections.Counter()
  for program, (fn, args, call) in programs.items():
    text = fn.lower(*args).compile().as_text()
    kinds = _categories(text)
    shapes = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])", text, re.M))
    folder = tempfile.mkdtemp(prefix="bench_pas_trace_")
    jax.profiler.start_trace(folder)
    jax.block_until_ready(call())
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]
    for event in json.load(gzip.open(path))["traceEvents"]:
      name = event.get("name")
      if event.get("ph") == "X" and name in kinds:
        seconds[kinds[name]] += event["dur"] / 1e6
        by_op[(program, name, kinds[name], shapes.get(name, "?"))] += event["dur"] / 1e6
  total = sum(seconds.values())
  return {"kinds": [(kind, s, s / total) for kind, s in seconds.most_common()],
          "top": [(*key, s) for key, s in by_op.most_common(14)]}


# --- report -----------------------------------------------------------------------------------

def row(s: dict, peak: float) -> str:
  run = steady(s)
  util = f"{s['flops'] / run / peak:.0%}" if s["flops"] else "-"
  rate = lambda x: f"{x / run:,.0f}" if x else "-"
  memory = f"{s['rss_mb']:,.0f}" + (f" (device {s['device_mb']:,.0f})" if s.get("device_mb")
                                    else "")
  per = f"{s['wall_s'] / s['subjects']:.1f}" if s["subjects"] > 1 else "-"
  return (f"| {s['stage']} | {s['wall_s']:.1f} | {s['compile_s']:.1f} | {run:.1f} | {per} | "
          f"{rate(s['tokens'])} | {s['flops'] / 1e9:,.0f} | {rate(s['flops'] / 1e9)} | {util} | "
          f"{memory} | {s['load1']:.1f} | {s['note']} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--subjects", default="1,8", help="subject counts measured, e.g. 1,8")
  parser.add_argument("--extrapolate", default="32,300",
                      help="subject counts planned and extrapolated (not run)")
  parser.add_argument("--protocols", default="oracle,honest",
                      help="oracle (the paper's: every alpha on the test items) and/or honest")
  parser.add_argument("--reference", choices=["torch", "none"], default="torch",
                      help="run benchmarks/reference_torch.py on the fixed case (~4 min)")
  parser.add_argument("--no_fixed_case", action="store_true", help="skip the fixed case")
  parser.add_argument("--profile", action="store_true",
                      help="trace one encode and one question batch; time by kind of operation")
  parser.add_argument("--prefix_batch", type=int, default=default.get_config().scoring.prefix_batch,
                      help="config.scoring.prefix_batch (0: sized to memory)")
  parser.add_argument("--question_batch", type=int,
                      default=default.get_config().scoring.question_batch,
                      help="config.scoring.question_batch")
  parser.add_argument("--save_json", help="also write the raw measurements here")
  args = parser.parse_args()
  track_compiles()
  counts = [int(x) for x in args.subjects.split(",") if x]
  protocols = [p for p in args.protocols.split(",") if p]
  loads = [os.getloadavg()]
  peaks = [planner.matmul_peak()]
  config = run_config(args)

  t = time.perf_counter()
  engine = engine_lib.Engine.from_config(config)
  stages = [stage("model load (orbax-cached params)", t, time.perf_counter())]
  ScoreLog(engine)
  settings = alignment.AlignSettings.from_config(
      config, engine.config.num_layers * engine.config.num_heads)
  t = time.perf_counter()
  activations = engine._compute_activations()  # always computed: the disk cache is not read
  end = time.perf_counter()
  split, items = data.load_split(), data.load_items()
  lens = [len(prompts.encode_activation_prompt(engine.model.tokenizer, items.text[j], letter))
          for j in split.known for letter in engine_lib.ACTIVATION_LETTERS]
  tokens, flops = planner.capture_cost(engine.config, lens)
  stages.append(stage("shared activations (once per model)", t, end, tokens=tokens, flops=flops,
                      note=f"{len(lens)} sequences"))

  out = {"stages": stages, "protocols": {}, "reference": None}
  if not args.no_fixed_case:
    first = fixed_case(engine, activations, settings)
    first["stage"]["stage"] += " (1st: compiles)"
    stages.append(first["stage"])
    if args.reference == "torch":
      with tempfile.NamedTemporaryFile(suffix=".json") as raw:
        subprocess.run([sys.executable, os.path.join(HERE, "reference_torch.py"),
                        f"--subject={FIXED_SUBJECT}", "--alphas=0,4", f"--json={raw.name}"],
                       check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..")))
        out["reference"] = json.load(open(raw.name))
    second = fixed_case(engine, activations, settings)
    second["stage"]["stage"] += " (2nd: after the reference)"
    stages.append(second["stage"])
    out["fixed_letters"] = second["letters"]
  for protocol in protocols:
    for count in counts:
      print(f"running {protocol} S={count} ...", file=sys.stderr, flush=True)
      result = protocol_run(engine, activations, settings, count, protocol)
      stages.append(result["stage"])
      out["protocols"][f"{protocol}:{count}"] = result
  extrapolated = {}
  for protocol in protocols:
    for count in [int(x) for x in args.extrapolate.split(",") if x]:
      extrapolated[f"{protocol}:{count}"] = plan_cost(engine, count, protocol, settings)
  profile = profile_programs(engine) if args.profile else None
  peaks.append(planner.matmul_peak())
  loads.append(os.getloadavg())
  peak = max(peaks)

  # --- report
  print(f"# bench_pas: SmolLM2-135M-Instruct (float32, real GGUF), {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; question_batch {engine.question_batch}, prefix_batch "
        f"{args.prefix_batch or 'auto'} (= {engine.prefix_batch(1400)} at a 1,400-token context)")
  print(f"# load average before {loads[0][0]:.2f}/{loads[0][1]:.2f}/{loads[0][2]:.2f}, after "
        f"{loads[1][0]:.2f}/{loads[1][1]:.2f}/{loads[1][2]:.2f}; matmul peak (2048^3 f32 jnp.dot, "
        f"best of 10, start/end): {peaks[0] / 1e9:.1f} / {peaks[1] / 1e9:.1f} GFLOP/s")
  print("| stage | wall s | compile s | steady s | wall s / subject | tok/s (steady) | GFLOP | "
        "GFLOP/s (steady) | util | peak RSS MB | load 1m | note |")
  print("|" + "---|" * 12)
  for s in stages:
    print(row(s, peak))

  if not args.no_fixed_case:
    ours = [s for s in stages if s["stage"].startswith("fixed case")]
    print("\n## The fixed comparison case (subject 172481, 30 held-out items, alphas 0 and 4, "
          "oracle sweep, probes excluded)")
    for s in ours:
      low, high = REFERENCE_FIXED_CASE_S
      wall = s["wall_s"]
      print(f"{s['stage']}: {wall:.1f} s wall ({steady(s):.1f} s steady); the reference as "
            f"measured in issue 8 (426-430 s): {low / wall:.1f}-{high / wall:.1f}x wall, "
            f"{low / steady(s):.1f}-{high / steady(s):.1f}x steady")
    if out["reference"]:
      ref = out["reference"]["total"]
      print(f"reference's way re-implemented in PyTorch (benchmarks/reference_torch.py), "
            f"measured in this run between our two runs: {ref['wall_s']:.1f} s "
            f"({ref['s_per_item']:.2f} s per item and alpha, {ref['tokens_per_s']:.0f} tok/s, "
            f"{out['reference']['threads']} threads); ours (2nd run) is "
            f"{ref['wall_s'] / ours[-1]['wall_s']:.1f}x faster wall, "
            f"{ref['wall_s'] / steady(ours[-1]):.1f}x steady")
      letters = [a["letter"] for row_ in out["reference"]["alphas"] for a in row_["answers"]]
      agree = np.mean([a == b for a, b in zip(letters, out["fixed_letters"], strict=False)])
      print(f"answer letters: reference (generated, parsed) vs ours (most likely letter) agree "
            f"on {agree:.0%} of the {len(letters)} answers")

  print("\n## Per subject")
  for protocol in protocols:
    rate_stage = None
    for count in counts:
      result = out["protocols"][f"{protocol}:{count}"]
      s = result["stage"]
      rate_stage = s
      print(f"{protocol} S={count}: {s['wall_s'] / count:.1f} s wall per subject "
            f"({steady(s) / count:.1f} s steady); stages (batch totals): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in result["stage_seconds"].items()))
      if protocol == "oracle":
        print(f"  vs the reference's paper protocol (~{REFERENCE_PAPER_PROTOCOL_S:,.0f} s per "
              f"subject, extrapolated in issue 8 from its measured 213-215 s per alpha on 30 "
              f"items): {REFERENCE_PAPER_PROTOCOL_S / (s['wall_s'] / count):.1f}x wall")
    rate = rate_stage["flops"] / steady(rate_stage) if rate_stage else None
    for key, (flops, shapes) in extrapolated.items():
      if not key.startswith(protocol + ":"):
        continue
      n = int(key.split(":")[1])
      timing = (f"EXTRAPOLATED {flops / rate / n:.1f} s per subject ({flops / 1e12:,.1f} TFLOP "
                f"planned / {rate / 1e9:.1f} GFLOP/s measured at S={counts[-1]})" if rate else
                f"{flops / 1e12:,.1f} TFLOP planned (nothing measured to time it)")
      print(f"{protocol} S={n}: {timing}; compiles {len(shapes)} scoring programs "
            f"({sum(1 for x in shapes if x[0] == 'encode')} encode, "
            f"{sum(1 for x in shapes if x[0] == 'score')} score)")
  if profile:
    print("\n## Where the time goes (one context encode + one question batch, profiler trace)")
    print("| kind of operation | seconds | share |\n|---|---|---|")
    for kind, seconds, share in profile["kinds"]:
      print(f"| {kind} | {seconds:.2f} | {share:.0%} |")
    print("\n| program | slowest operations | kind | output | seconds |\n|---|---|---|---|---|")
    for program, op, kind, shape, seconds in profile["top"]:
      print(f"| {program} | {op} | {kind} | {shape} | {seconds:.2f} |")
  print(f"\nscoring programs compiled in this process: {scoring.compiled_programs()}")
  if args.save_json:
    with open(args.save_json, "w") as f:
      json.dump({"stages": stages, "peaks": peaks, "loads": loads, "profile": profile,
                 "extrapolated": {k: [v[0], len(v[1])] for k, v in extrapolated.items()},
                 "reference": out["reference"],
                 "alphas": {k: v["alphas"] for k, v in out["protocols"].items()}}, f, indent=1)


if __name__ == "__main__":
  main()
