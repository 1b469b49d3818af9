"""Benchmark: end-to-end PAS per subject on the real SmolLM2 vs the reference's way.

Stages, each timed on its own (wall, of which compile, and the rest = steady state):
model load (orbax-cached params), the shared activations (240 forwards over the 120 known
items, computed, not read from the cache), probe fitting, the oracle alpha sweep (every
alpha x 180 held-out items, prefix-shared scoring), the honest k-fold alpha selection,
and the evaluation records. They run through `search.run_sweep` exactly as
`launch/evaluate.py` runs them; the score function and progress callback only take
timestamps. Compile time is read from JAX's own compile events (trace, lowering, XLA
compile; overlapping events merged).

Baselines, in the same invocation, each in its own subprocess (so `ru_maxrss` is its own):
  * the reference's way: every prompt (context + question) re-encoded and 15 tokens
    generated greedily, batches of 10 (`scoring.generate`);
  * naive scoring: every full prompt re-encoded, the answer read from the next-token
    distribution (`scoring.score_full_prompts`), no generation.
Both run on `--naive_questions` questions and are EXTRAPOLATED linearly to alphas x
held-out items per subject (the output says so).

Scaling: `--subjects=1,8` measures each count for real (in one process, so later counts
reuse programs compiled by earlier ones). Counts in `--extrapolate` are not scored: their
probe fits are run and timed for real, their exact scoring FLOPs are counted from their
own tokenized prompts and turned into time with the steady FLOP rate measured above, plus
the measured compile time per program shape for each shape the measured run did not
compile.

FLOPs are those the programs execute: matmuls (2 * m * n * k) and attention over every
key slot, padding included; elementwise work and probe fitting are not counted.
Utilisation is steady-state FLOP/s over the best large `jnp.dot` FLOP/s measured in this
run. The 1-minute load average is printed next to each stage: the dev box is shared.

  python benchmarks/bench_pas.py                                # SmolLM2, 1 subject, CPU
  python benchmarks/bench_pas.py --subjects=1,8,32 --extrapolate=300
  python benchmarks/bench_pas.py --config=llama3_8b --matmul_n=8192   # random bf16, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scoring import matmul_peak  # noqa: E402  (same directory; one definition of the peak)

from palign_jax import data, prompts, scoring  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402
from palign_jax.evaluation import methods  # noqa: E402
from palign_jax.models import loading  # noqa: E402
from palign_jax.models.config import ModelConfig, RopeScaling  # noqa: E402
from palign_jax.pas import directions as pas_directions  # noqa: E402
from palign_jax.pas import search  # noqa: E402

# name -> (ModelConfig or None for the real SmolLM2 GGUF, params dtype)
CONFIGS = {
    "smollm2": (None, "float32"),
    # Random weights; prompts are tokenized with SmolLM2's tokenizer (ids < 49152), which
    # gives Llama 3-like lengths. For a GPU: 16 GB of bfloat16 parameters.
    "llama3_8b": (ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072),
        "bfloat16"),
}
CAPTURE_BATCH = 16  # scoring.capture_head_outputs' default, used by Engine.activations


# --- timing -----------------------------------------------------------------------------------

_COMPILE_SPANS: list[tuple[float, float]] = []


def _on_duration(event: str, duration: float, **_) -> None:
  if event.startswith("/jax/core/compile/"):
    end = time.perf_counter()
    _COMPILE_SPANS.append((end - duration, end))


def compile_seconds(start: float, end: float) -> float:
  """Seconds within [start, end] spent tracing, lowering or compiling (nested spans merged)."""
  spans = sorted((max(a, start), min(b, end)) for a, b in _COMPILE_SPANS if b > start and a < end)
  total, reach = 0.0, start
  for a, b in spans:
    if b > reach:
      total += b - max(a, reach)
      reach = b
  return total


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def stage(name: str, start: float, end: float, *, compile_s: float | None = None,
          tokens: float = 0, flops: float = 0, note: str = "") -> dict:
  return {"stage": name, "wall_s": end - start,
          "compile_s": compile_seconds(start, end) if compile_s is None else compile_s,
          "tokens": tokens, "flops": flops, "rss_mb": peak_rss_mb(),
          "device_mb": device_peak_mb(), "load1": os.getloadavg()[0], "note": note}


# --- FLOPs of the programs scoring.py runs ----------------------------------------------------

def layer_flops(c: ModelConfig, tokens: int, keys: int) -> float:
  """FLOPs of all decoder layers for `tokens` queries each attending to `keys` slots."""
  linear = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  linear += 2 * c.num_heads * c.head_dim * c.hidden_size + 6 * c.hidden_size * c.intermediate_size
  return c.num_layers * tokens * (linear + 4 * c.num_heads * c.head_dim * keys)


def head_flops(c: ModelConfig, rows: int, vocab: int) -> float:
  return 2 * c.hidden_size * vocab * rows


def prefix_shared_cost(c: ModelConfig, prefix_lens, question_lens, question_batch: int):
  """`score_prefix_shared` (prefix_batch 1) -> (real tokens, FLOPs, program shapes)."""
  q_len = scoring.bucket_length(max(question_lens))
  batches = -(-len(question_lens) // question_batch)
  flops, shapes = 0.0, set()
  for p in prefix_lens:
    s = scoring.bucket_length(p)
    flops += layer_flops(c, s, s) + batches * (
        layer_flops(c, question_batch * q_len, s + q_len) + head_flops(c, question_batch, 5))
    shapes |= {("encode", s), ("score", s, q_len)}
  tokens = sum(prefix_lens) + len(prefix_lens) * sum(question_lens)
  return tokens, flops, shapes


def capture_cost(c: ModelConfig, lens, batch: int = CAPTURE_BATCH):
  """`capture_head_outputs` (length-sorted batches, each padded to its bucket)."""
  lens = sorted(lens)
  flops = 0.0
  for start in range(0, len(lens), batch):
    length = scoring.bucket_length(max(lens[start:start + batch]))
    flops += layer_flops(c, batch * length, length)
  return sum(lens), flops


def generate_cost(c: ModelConfig, lens, new_counts, max_new: int):
  """One `scoring.generate` batch: prefill, then one step per token after the first."""
  length, rows = scoring.bucket_length(max(lens)), len(lens)
  steps = max(new_counts) - 1
  flops = layer_flops(c, rows * length, length) + head_flops(c, rows, c.vocab_size)
  flops += steps * (layer_flops(c, rows, length + max_new) + head_flops(c, rows, c.vocab_size))
  return sum(lens) + sum(new_counts), flops


def full_prompt_cost(c: ModelConfig, lens, batch: int):
  """`score_full_prompts`: every prompt padded to one bucket, batches of `batch` rows."""
  length = scoring.bucket_length(max(lens))
  rows = -(-len(lens) // batch) * batch
  return sum(lens), layer_flops(c, rows * length, length) + head_flops(c, rows, 5)


# --- the model --------------------------------------------------------------------------------

def load_engine(args) -> engine_lib.Engine:
  config, dtype = CONFIGS[args.config]
  if config is None:
    return engine_lib.Engine.load(None, dtype=dtype, question_batch=args.question_batch)
  from palign_jax.models.llama import init_params
  tokenizer = loading.load_model(None).tokenizer
  params = init_params(config, jax.random.key(0), jnp.dtype(dtype))
  model = loading.LoadedModel(config=config, params=params, tokenizer=tokenizer,
                              fingerprint=f"random-{args.config}", source="random")
  return engine_lib.Engine(model, question_batch=args.question_batch)


def subject_batch(count: int) -> data.Subjects:
  subjects = data.load_papi_subjects()
  if count > len(subjects):
    raise SystemExit(f"--subjects/--extrapolate: {count} > {len(subjects)} PAPI subjects")
  return subjects.select(subjects.ids[:count])


def settings_from(args) -> search.PasSettings:
  return search.PasSettings(alphas=tuple(args.alphas), folds=max(args.folds, 2))


def sweep_plan(known: np.ndarray, settings: search.PasSettings, heldout: np.ndarray,
               with_selection: bool) -> list[tuple[str, list[str], np.ndarray]]:
  """The score calls `run_sweep` makes: (kind, systems (one per subject x alpha), items)."""
  systems = lambda answers: [prompts.few_shot_system_prompt(row) for row in answers
                             for _ in settings.alphas]
  calls = [("oracle", systems(known), heldout)]
  if with_selection:
    fold = search.fold_of_known_items(settings.folds, settings.seed)
    known_items = data.load_split().known
    for f in range(settings.folds):
      calls.append(("honest", systems(np.where((fold == f)[None], 0, known)),
                    known_items[fold == f]))
  return calls


def call_cost(engine: engine_lib.Engine, systems, items):
  tokenizer = engine.model.tokenizer
  prefix_lens = [len(prompts.encode_system(tokenizer, s)) for s in systems]
  question_lens = [len(q) for q in engine._question_suffixes(items)]
  return prefix_shared_cost(engine.config, prefix_lens, question_lens, engine.question_batch)


# --- the PAS pipeline (child process) ---------------------------------------------------------

def run_pas(args) -> dict:
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  out: dict = {"stages": [], "runs": []}
  t = time.perf_counter()
  engine = load_engine(args)
  out["stages"].append(stage("model load", t, time.perf_counter(),
                             note=f"{engine.source}, {engine.params_dtype}"))
  c = engine.config

  split, items = data.load_split(), data.load_items()
  t = time.perf_counter()
  activations = engine._compute_activations()  # always computed: the disk cache is not used
  end = time.perf_counter()
  lens = [len(prompts.encode_activation_prompt(engine.model.tokenizer, items.text[j], letter))
          for j in split.known for letter in engine_lib.ACTIVATION_LETTERS]
  tokens, flops = capture_cost(c, lens)
  out["stages"].append(stage("shared activations (once per model)", t, end, tokens=tokens,
                             flops=flops, note=f"{len(lens)} sequences, mean {np.mean(lens):.0f} "
                             "tok"))

  settings = settings_from(args)
  heldout = split.heldout[:args.heldout_items]
  with_selection = args.folds > 0
  for count in args.subjects:
    batch = subject_batch(count)
    known = data.known_answers(batch).astype(np.int64)
    calls, marks = [], []

    def score(systems, items, steering, calls=calls):
      start = time.perf_counter()
      result = engine.score(systems, items, steering)
      calls.append((start, time.perf_counter(), list(systems), np.asarray(items)))
      return result

    def progress(message, marks=marks, count=count):
      marks.append((time.perf_counter(), message))
      print(f"[S={count}] {message} (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
            flush=True)

    start = time.perf_counter()
    sweep = search.run_sweep(score, activations, known, settings, subject_ids=batch.ids,
                             heldout=heldout, with_selection=with_selection, progress=progress)
    end = time.perf_counter()
    # Evaluation: the same records `launch/evaluate.py` stores (metrics per method).
    wanted = methods.SWEEP_METHODS if with_selection else ("few_shot", "pas_oracle_test")
    records = methods.sweep_records(sweep, batch, wanted, settings, (end - start) / count)
    evaluated = time.perf_counter()

    costs = [call_cost(engine, systems, items) for _, _, systems, items in calls]
    label = f"S={count}"
    stages = [stage(f"{label} probe fit, all known items", start, marks[0][0],
                    note=f"{count} subject(s) in one jit")]
    oracle_tokens, oracle_flops, _ = costs[0]
    stages.append(stage(f"{label} oracle sweep: {len(settings.alphas)} alphas x "
                        f"{len(heldout)} items", marks[0][0], calls[0][1],
                        tokens=oracle_tokens, flops=oracle_flops,
                        note=f"{count * len(settings.alphas)} prefixes"))
    if with_selection:
      fit_s = sum(call[0] - mark[0] for call, mark in zip(calls[1:], marks[1:], strict=True))
      fit_compile = sum(compile_seconds(mark[0], call[0])
                        for call, mark in zip(calls[1:], marks[1:], strict=True))
      stages.append(stage(f"{label} honest: {settings.folds} fold probe fits", 0, fit_s,
                          compile_s=fit_compile))
      score_s = sum(b - a for a, b, _, _ in calls[1:])
      stages.append(stage(
          f"{label} honest: {settings.folds} folds x {len(settings.alphas)} alphas scored",
          0, score_s, compile_s=sum(compile_seconds(a, b) for a, b, _, _ in calls[1:]),
          tokens=sum(x[0] for x in costs[1:]), flops=sum(x[1] for x in costs[1:]),
          note=f"{count * settings.folds * len(settings.alphas)} prefixes"))
    stages.append(stage(f"{label} evaluation records", end, evaluated))
    stages.append(stage(f"{label} run_sweep total", start, end,
                        tokens=sum(x[0] for x in costs), flops=sum(x[1] for x in costs)))
    out["stages"].extend(stages)
    zero = list(settings.alphas).index(0.0) if 0.0 in settings.alphas else 0
    summary = {}
    for r in records:
      summary[r["subject"] + " " + r["method"]] = {
          "alpha": r.get("alpha"), "sum_error": r["decodings"]["argmax"]["sum"]}
    out["runs"].append({
        "subjects": count, "shapes": sorted(map(list, set().union(*(x[2] for x in costs)))),
        "records": summary,
        "alpha0_log_probs": sweep.test_log_probs[0, zero, :args.naive_questions].tolist()})

  out["extrapolations"] = [extrapolation_inputs(engine, activations, settings, heldout, count,
                                                with_selection)
                           for count in args.extrapolate]
  out["matmul_peak"] = matmul_peak(CONFIGS[args.config][1], args.matmul_n)
  return out


def extrapolation_inputs(engine, activations, settings, heldout, count: int,
                         with_selection: bool) -> dict:
  """For `count` subjects: the probe fits run for real, scoring FLOPs and shapes counted."""
  batch = subject_batch(count)
  known = data.known_answers(batch).astype(np.int64)
  calls = sweep_plan(known, settings, heldout, with_selection)
  costs = {"oracle": [0, 0.0], "honest": [0, 0.0]}
  shapes: set = set()
  for kind, systems, items in calls:
    tokens, flops, call_shapes = call_cost(engine, systems, items)
    costs[kind][0] += tokens
    costs[kind][1] += flops
    shapes |= call_shapes
  # The fits run_sweep makes (all known items, then one per fold), timed for real.
  fit_s, fit_compile = 0.0, 0.0
  fold = search.fold_of_known_items(settings.folds, settings.seed)
  masks = [known] + ([np.where((fold == f)[None], 0, known) for f in range(settings.folds)]
                     if with_selection else [])
  seeds = search.subject_seeds(batch.ids)
  for salt, visible in enumerate(masks):
    start = time.perf_counter()
    fit = pas_directions.fit_pas(
        activations, visible, top_k=int(settings.top_k), subject_ids=seeds,
        key=jax.random.fold_in(jax.random.PRNGKey(settings.seed), salt))
    jax.block_until_ready(fit)
    end = time.perf_counter()
    fit_s += end - start
    fit_compile += compile_seconds(start, end)
  return {"subjects": count, "oracle_tokens": costs["oracle"][0],
          "oracle_flops": costs["oracle"][1], "honest_tokens": costs["honest"][0],
          "honest_flops": costs["honest"][1], "shapes": sorted(map(list, shapes)),
          "fit_s": fit_s, "fit_compile_s": fit_compile, "rss_mb": peak_rss_mb()}

# --- the baselines (child processes) ----------------------------------------------------------

def naive_prompts(engine: engine_lib.Engine, args, chat: bool) -> list[list[int]]:
  """Subject 1's full prompts for the first `naive_questions` held-out items.

  chat: system + question + the generation prompt (the reference generates the answer);
  else system + question + "Option (" (the answer letter is the next token).
  """
  tokenizer = engine.model.tokenizer
  system = prompts.few_shot_system_prompt(data.known_answers(subject_batch(1))[0])
  texts = [data.load_items().text[j] for j in data.load_split().heldout[:args.naive_questions]]
  if chat:
    return [prompts.encode_chat_prompt(tokenizer, system, prompts.question(t)) for t in texts]
  encoded = [prompts.encode_question(tokenizer, system, t) for t in texts]
  return [q.prefix + q.suffix for q in encoded]


def run_baseline(args) -> dict:
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  engine = load_engine(args)
  c, params = engine.config, engine.model.params
  # Zero steering: the same program as a steered run (PAS adds it to every head's output).
  steering = jnp.zeros((c.num_layers, c.num_heads, c.head_dim), params["embed_tokens"][
      "embedding"].dtype)
  out: dict = {}
  if args.child == "generate":
    batches = naive_prompts(engine, args, chat=True)
    tokenizer = engine.model.tokenizer
    eos = [i for i in {tokenizer.eos_token_id} if i is not None]
    tokens = flops = 0.0
    answers = []
    start = time.perf_counter()
    for first in range(0, len(batches), args.naive_batch):
      chunk = batches[first:first + args.naive_batch]
      generated = scoring.generate(params, c, chunk, args.max_new_tokens, steering=steering,
                                   eos_ids=eos)
      t, f = generate_cost(c, list(map(len, chunk)), list(map(len, generated)),
                           args.max_new_tokens)
      tokens, flops = tokens + t, flops + f
      answers += [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    end = time.perf_counter()
    out["stage"] = stage(f"reference's way: re-encode + generate {args.max_new_tokens} tok",
                         start, end, tokens=tokens, flops=flops,
                         note=f"{len(batches)} questions, batches of {args.naive_batch}")
    out["example_answers"] = answers[:3]
  else:
    full = naive_prompts(engine, args, chat=False)
    start = time.perf_counter()
    log_probs = scoring.score_full_prompts(params, c, full, engine.option_ids,
                                           steering=steering, batch_size=args.naive_batch)
    end = time.perf_counter()
    tokens, flops = full_prompt_cost(c, list(map(len, full)), args.naive_batch)
    out["stage"] = stage("naive scoring: re-encode every prompt, no generation", start, end,
                         tokens=tokens, flops=flops,
                         note=f"{len(full)} questions, batches of {args.naive_batch}")
    out["log_probs"] = np.asarray(log_probs).tolist()
  out["questions"] = args.naive_questions
  out["matmul_peak"] = matmul_peak(CONFIGS[args.config][1], args.matmul_n)
  return out


# --- report -----------------------------------------------------------------------------------

def steady(s: dict) -> float:
  return max(s["wall_s"] - s["compile_s"], 1e-9)


def table_row(s: dict, peak: float) -> str:
  run = steady(s)
  rate = lambda x, fmt: fmt.format(x / run) if x else "-"
  util = f"{s['flops'] / run / peak:.0%}" if s["flops"] else "-"
  gflop = f"{s['flops'] / 1e9:,.0f}" if s["flops"] else "-"
  tokens = f"{s['tokens']:,.0f}" if s["tokens"] else "-"
  memory = f"{s['rss_mb']:,.0f}"
  if s.get("device_mb"):
    memory += f" (device {s['device_mb']:,.0f})"
  return (f"| {s['stage']} | {s['wall_s']:.1f} | {s['compile_s']:.1f} | {run:.1f} | {tokens} | "
          f"{rate(s['tokens'], '{:,.0f}')} | {gflop} | {rate(s['flops'] / 1e9, '{:.1f}')} | "
          f"{util} | {memory} | {s['load1']:.1f} |")


def by_name(stages: list[dict], prefix: str) -> dict | None:
  return next((s for s in stages if s["stage"].startswith(prefix)), None)


def report(args, results: dict, peaks: list[float], loads: list[tuple]) -> None:
  pas, gen, naive = results["pas"], results["generate"], results["score"]
  peak = max(peaks)
  stages = pas["stages"]
  per_subject_items = len(args.alphas) * min(args.heldout_items, 180)
  config, dtype = CONFIGS[args.config]
  print(f"# {args.config} ({dtype}{', random weights' if config else ', real GGUF'}), "
        f"{jax.devices()[0].device_kind}, alphas={args.alphas}, folds={args.folds}, "
        f"held-out items={min(args.heldout_items, 180)}, question_batch={args.question_batch}")
  print(f"# load average (1/5/15 min) before: {loads[0][0]:.2f}/{loads[0][1]:.2f}/"
        f"{loads[0][2]:.2f}, after: {loads[1][0]:.2f}/{loads[1][1]:.2f}/{loads[1][2]:.2f}")
  print(f"# matmul peak ({args.matmul_n}^3 {dtype} jnp.dot, best of 10, measured "
        f"{len(peaks)} times): {peak / 1e9:.1f} GFLOP/s "
        f"(each: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
  header = ("stage", "wall s", "compile s", "steady s", "tokens", "tok/s (steady)", "GFLOP",
            "GFLOP/s (steady)", "util", "peak RSS MB", "load 1m")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for s in stages + [gen["stage"], naive["stage"]]:
    print(table_row(s, peak))

  # Per subject, from the first measured count.
  count = args.subjects[0]
  label = f"S={count}"
  load, acts = stages[0], stages[1]
  fit = by_name(stages, f"{label} probe fit")
  oracle = by_name(stages, f"{label} oracle sweep")
  fold_fits = by_name(stages, f"{label} honest: {args.folds} fold probe fits")
  folds = by_name(stages, f"{label} honest: {args.folds} folds")
  total = by_name(stages, f"{label} run_sweep total")
  evaluation = by_name(stages, f"{label} evaluation")
  print(f"\n## Per subject ({label}, divided by {count}; wall includes compile)")
  oracle_wall = (fit["wall_s"] + oracle["wall_s"] + evaluation["wall_s"]) / count
  oracle_steady = (steady(fit) + steady(oracle)) / count
  print(f"oracle protocol (fit + {len(args.alphas)} alphas x {min(args.heldout_items, 180)} "
        f"held-out + records): {oracle_wall:.1f} s wall, {oracle_steady:.1f} s steady")
  if folds:
    print(f"run_sweep as evaluate.py runs it (oracle sweep + {args.folds}-fold selection): "
          f"{(total['wall_s'] + evaluation['wall_s']) / count:.1f} s wall, "
          f"{steady(total) / count:.1f} s steady")
    honest_only = (steady(fit) + steady(fold_fits) + steady(folds)
                   + steady(oracle) / len(args.alphas)) / count
    print(f"honest-only (DERIVED: fits + {args.folds}-fold selection + the chosen alpha alone on "
          f"the held-out items = oracle sweep / {len(args.alphas)}): {honest_only:.1f} s steady")
  gen_q = steady(gen["stage"]) / gen["questions"]
  naive_q = steady(naive["stage"]) / naive["questions"]
  reference = gen_q * per_subject_items
  print(f"reference's way (EXTRAPOLATED from {gen['questions']} questions, "
        f"{gen_q:.2f} s/question steady, to {per_subject_items} = {len(args.alphas)} alphas x "
        f"{min(args.heldout_items, 180)}): {reference:.0f} s = {reference / 60:.1f} min; "
        f"vs oracle protocol steady: {reference / oracle_steady:.1f}x, "
        f"vs wall: {reference / oracle_wall:.1f}x")
  print(f"naive scoring, no generation (EXTRAPOLATED from {naive['questions']} questions, "
        f"{naive_q:.2f} s/question): {naive_q * per_subject_items:.0f} s; "
        f"vs oracle protocol steady: {naive_q * per_subject_items / oracle_steady:.1f}x")
  print(f"reference-way answers (first 3): {gen['example_answers']}")
  agree = np.abs(np.array(pas["runs"][0]["alpha0_log_probs"])
                 - np.array(naive["log_probs"])).max()
  print(f"max |prefix-shared (alpha 0) - naive| option log-prob on the naive questions: "
        f"{agree:.2e}")
  for key, value in list(pas["runs"][0]["records"].items())[:3 * count][:6]:
    error = "n/a" if value["sum_error"] is None else f"{value['sum_error']:.3f}"
    print(f"  {key}: alpha {value['alpha']}, sum of trait errors (argmax) {error}")

  # Scaling.
  measured = pas["runs"]
  first = measured[0]
  scoring_compile = oracle["compile_s"] + (folds["compile_s"] if folds else 0.0)
  per_shape = scoring_compile / len(first["shapes"])
  last = f"S={measured[-1]['subjects']}"
  rate_oracle = by_name(stages, f"{last} oracle sweep")
  rate_folds = by_name(stages, f"{last} honest: {args.folds} folds")
  rate_o = rate_oracle["flops"] / steady(rate_oracle)
  rate_h = rate_folds["flops"] / steady(rate_folds) if rate_folds else rate_o
  fixed = load["wall_s"] + acts["wall_s"]
  print(f"\n## Scaling (wall s; every column includes model load + activations = {fixed:.0f} s; "
        f"compile per scoring program shape, from {label}: {per_shape:.1f} s)")
  print("| subjects | how | oracle protocol | + honest selection | per subject (both) | "
        "reference's way (extrap.) | ratio ref / oracle | ratio ref / both |")
  print("|---|---|---|---|---|---|---|---|")

  def row(n, how, oracle_s, both_s):
    ref = fixed + reference * n
    print(f"| {n} | {how} | {oracle_s:.0f} | {both_s:.0f} | {(both_s - fixed) / n:.0f} | "
          f"{ref:.0f} | {ref / oracle_s:.1f}x | {ref / both_s:.1f}x |")

  for run in measured:
    lab = f"S={run['subjects']}"
    parts = [by_name(stages, f"{lab} {name}") for name in ("probe fit", "oracle sweep",
                                                            "evaluation", "run_sweep total")]
    row(run["subjects"], "measured", fixed + sum(x["wall_s"] for x in parts[:3]),
        fixed + parts[2]["wall_s"] + parts[3]["wall_s"])
  for ext in pas["extrapolations"]:
    n = ext["subjects"]
    compiled = len(ext["shapes"]) * per_shape
    oracle_s = fixed + ext["fit_s"] + compiled + ext["oracle_flops"] / rate_o
    row(n, f"EXTRAPOLATED: fits run ({ext['fit_s']:.0f} s), scoring = its exact FLOPs "
        f"({(ext['oracle_flops'] + ext['honest_flops']) / 1e12:,.0f} TFLOP) / the steady rate "
        f"above + {len(ext['shapes'])} shapes x compile", oracle_s,
        oracle_s + ext["honest_flops"] / rate_h)
  print("reference's way = the extrapolated per-subject time above x subjects, plus the same "
        "load + activations (it has no honest selection)")


def run_child(name: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}"] + sys.argv[1:]
  out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), default="smollm2")
  parser.add_argument("--subjects", type=int_list, default=[1],
                      help="subject counts measured for real, e.g. 1,8 (PAPI subjects 1..S)")
  parser.add_argument("--extrapolate", type=int_list, default=[8, 32],
                      help="subject counts extrapolated (their probe fits are run for real)")
  parser.add_argument("--alphas", type=lambda s: [float(x) for x in s.split(",")],
                      default=list(search.PasSettings.alphas))
  parser.add_argument("--folds", type=int, default=search.PasSettings.folds,
                      help="k of the honest selection; 0 skips it (oracle only)")
  parser.add_argument("--heldout_items", type=int, default=180,
                      help="held-out items scored per (subject, alpha); 180 = the protocol")
  parser.add_argument("--question_batch", type=int, default=64,
                      help="questions per batch against one prefix (configs/default.py: 64)")
  parser.add_argument("--naive_questions", type=int, default=10)
  parser.add_argument("--naive_batch", type=int, default=10)
  parser.add_argument("--max_new_tokens", type=int, default=15)
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--save_json", help="also write the raw measurements here")
  parser.add_argument("--report_from", help="print the report of a --save_json file (same flags)")
  parser.add_argument("--child", choices=["pas", "generate", "score"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.folds == 1:
    parser.error("--folds: 1 leaves nothing to fit on; use 0 (no selection) or >= 2")
  if args.child:
    print(json.dumps(run_pas(args) if args.child == "pas" else run_baseline(args)))
    return
  if args.report_from:
    with open(args.report_from) as f:
      saved = json.load(f)
    report(args, saved["results"], saved["peaks"], saved["loads"])
    return
  loads = [os.getloadavg()]
  peaks = [matmul_peak(CONFIGS[args.config][1], args.matmul_n)]
  results = {}
  for name in ("pas", "generate", "score"):
    print(f"running {name} ...", file=sys.stderr, flush=True)
    results[name] = run_child(name)
    peaks.append(results[name]["matmul_peak"])
  loads.append(os.getloadavg())
  if args.save_json:
    with open(args.save_json, "w") as f:
      json.dump({"results": results, "peaks": peaks, "loads": loads}, f)
  report(args, results, peaks, loads)


if __name__ == "__main__":
  main()
