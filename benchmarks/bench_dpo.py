"""Benchmark: PAS against the DPO baseline, the same subjects and model in one run: time to
align, FLOPs and error.

What runs (one process, the model loaded once through the project's Engine; JAX compile time is
read from JAX's compile events and shown apart):

1. PAS as `launch.evaluate --methods=pas` runs it (`protocol.alignment.align_subjects`, the
   honest `kfold_known` selection, config defaults: 6 alphas, 3 folds, top 24 heads), after the
   shared activations (computed here, not read from the disk cache: once per model, shared by
   every subject). Optimisation = activations + probe fits + the folds' alpha sweeps; test
   scoring = the 180 held-out items at alpha 0 and the chosen alphas.
2. DPO as `launch.evaluate --methods=dpo` runs it (`protocol.dpo.align_subjects`): the preference
   pairs, the reference log-probabilities, LoRA training of one adapter per (subject, fold) and
   one on all known pairs, the folds' sweeps over the step snapshots. Optimisation = all of that
   plus the known-item part of the base-model sweep; test scoring = the held-out items under the
   chosen adapter plus the held-out part of the base-model sweep (that one call scores both; it
   is split by FLOPs).
3. DPO at the config's step counts (default max_steps 64, eval_every 16), EXTRAPOLATED when the
   run used fewer (`--max_steps`): training's steady time per step and the fold sweep's time per
   snapshot, as measured, times the config's counts; the rest as measured. Labelled so.

FLOPs are counted from the shapes (`palign_jax.planner`): scoring calls exactly as executed
(padding included); DPO training as 2x its forward FLOPs (`TRAIN_OVER_FORWARD`: the base is
frozen, so the backward pass computes activation gradients only, ~1x forward, not the weight
gradients that make full fine-tuning 3x) of the padded prompt and completion tables, every
row as executed (padding rows included) and step (the LoRA side paths and their gradients,
under one percent, are not counted). The error is the composite (sum over the five traits of
the mean absolute error on the held-out items) of each method's headline row ("chosen": the readout
picked on the known items), averaged over the subjects; `constant_3` beside it. The 1-minute
load average is printed: the times mean something only next to it.

  python benchmarks/bench_dpo.py            # 1 subject, DPO 8 steps: 17 min on 2 busy cores
  python benchmarks/bench_dpo.py --subjects=2 --max_steps=0 --save_json=/tmp/dpo.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import ScoreLog, compile_seconds, track_compiles  # noqa: E402  (same directory)

from palign_jax import data, parallel, planner, prompts  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402
from palign_jax.dpo import train as dpo_train  # noqa: E402
from palign_jax.evaluation import baselines  # noqa: E402
from palign_jax.protocol import alignment, records  # noqa: E402
from palign_jax.protocol import dpo as dpo_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Training FLOPs per forward FLOP with a frozen base and LoRA. Backpropagation through a matmul
# y = x W costs two matmuls: dL/dx = dL/dy W^T (activation gradient) and dL/dW = x^T dL/dy
# (weight gradient), each as costly as the forward one; hence the usual 3x for full
# fine-tuning. The base W is frozen, so dL/dW is never formed: 1 forward + 1 activation
# gradient = 2x. The gradients that are formed, the LoRA factors' (x a and its [rank]-wide
# products), are rank/width of a projection's cost (8/576 for SmolLM2), and the reference
# log-probabilities are computed once, not per step.
TRAIN_OVER_FORWARD = 2.0
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "..", "configs", "default.py"),
    "Run configuration (configs/default.py, the one every launcher reads); PAS runs at its "
    "values, DPO too except --max_steps/--eval_every. Override fields as --config.FIELD=VALUE.")
_SUBJECTS = flags.DEFINE_integer(
    "subjects", 1, "How many PAPI subjects (the first N), aligned as one batch by each method.")
_MODEL = flags.DEFINE_string("model", None, "Model (default: the config's, the embedded "
                             "SmolLM2-135M-Instruct GGUF); a .gguf file or a Hugging Face folder.")
_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", 8, "DPO optimizer steps per adapter in this run (0: the config's, default 64). "
    "The default is smaller so that the run fits a busy 2-core CPU; the config's step counts are "
    "then EXTRAPOLATED from the measured time per step.")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 4, "DPO snapshot interval in this run (0: the config's, default 16); the "
    "candidate step counts are 0, eval_every, ..., max_steps.")
_SAVE_JSON = flags.DEFINE_string("save_json", None, "Also write the raw measurements here.")

# Reported in the paper for Llama-3-8B-Instruct (PAPI composite error, their protocol: alpha
# chosen on the test items), and its statement that PAS needs about a fifth of DPO's time.
PAPER_ERROR = {"PAS": 4.41, "DPO": 7.45, "PPO": 7.62}
PAPER_PAS_OVER_DPO_TIME = 1 / 5

# Stage names of `work["stage_seconds"]` and the progress labels that open them.
PAS_LABELS = (("PAS fit on the known items", "probes"), ("fold ", None),
              ("test items", "test_sweep"))
DPO_LABELS = (("DPO: preference pairs", "pairs"), ("DPO: the base model", "base_sweep"),
              ("DPO: reference", "reference"), ("DPO: training", "train"),
              ("DPO fold", "fold_sweep"), ("DPO test items", "test_sweep"))


class Timeline:
  """The progress labels with their start times, to attribute compile time and scoring FLOPs
  to the stage that ran them."""

  def __init__(self):
    self.marks: list[tuple[float, str]] = []

  def __call__(self, label: str) -> None:
    self.marks.append((time.perf_counter(), label))

  def stage_of(self, label: str, labels) -> str:
    for prefix, name in labels:
      if label.startswith(prefix):
        if name is None:  # "fold f/k: PAS fit" or "fold f/k: N alphas x M items"
          return "fold_probes" if label.endswith("PAS fit") else "fold_sweep"
        return name
    return "other"

  def windows(self, labels, end: float) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for (t, label), (t_next, _) in zip(self.marks, self.marks[1:] + [(end, "")], strict=True):
      out.setdefault(self.stage_of(label, labels), []).append((t, t_next))
    return out


def attribute(score_log: ScoreLog, windows: dict) -> dict[str, dict]:
  """Per stage: compile seconds and the scoring calls' FLOPs and tokens inside its windows."""
  out = {}
  for name, spans in windows.items():
    calls = [c for c in score_log.calls for a, b in spans if a <= c["start"] < b]
    out[name] = {"compile_s": sum(compile_seconds(a, b) for a, b in spans),
                 "flops": sum(c["flops"] for c in calls), "tokens": sum(c["tokens"] for c in calls),
                 "calls": calls}
  return out


def dpo_train_flops(model_config, pref: dpo_train.PreferenceData, rows: int, steps: int,
                    pairs_per_step: int) -> float:
  """Training FLOPs: 2 x the forward of every row's minibatch at every step, on the padded
  tables (`dpo_train.completion_log_probs`: prompts [P, S] encoded, chosen and rejected
  branches [2P, T] against them, the full-vocabulary head at T - 1 positions of each)."""
  S, T = int(pref.prompts.shape[1]), int(pref.branches.shape[2])
  P, c = pairs_per_step, model_config
  forward = (planner.layer_flops(c, P * S, S) + planner.layer_flops(c, 2 * P * T, S + T)
             + 2 * c.hidden_size * c.vocab_size * 2 * P * (T - 1))
  return TRAIN_OVER_FORWARD * forward * rows * steps


def dpo_reference_flops(model_config, pref: dpo_train.PreferenceData) -> float:
  """`dpo_train.reference_log_probs`: chunks of REFERENCE_CHUNK prompts x every option."""
  prompts_, options, T = (int(x) for x in pref.branches.shape)
  S, n, c = int(pref.prompts.shape[1]), dpo_train.REFERENCE_CHUNK, model_config
  per_chunk = (planner.layer_flops(c, n * S, S) + planner.layer_flops(c, n * options * T, S + T)
               + 2 * c.hidden_size * c.vocab_size * n * options * (T - 1))
  return per_chunk * math.ceil(prompts_ / n)


def base_sweep_split(engine) -> float:
  """Share of the base-model sweep (known + held-out items + content-free questions, one call)
  that is the known items' (the step-0 candidate): by FLOPs of the two parts alone."""
  split = data.load_split()
  context = [len(engine.context_tokens(prompts.DEFAULT_SYSTEM_PROMPT))]
  cf = [len(q) for q in engine._content_free]
  cost = lambda items: planner.score_cost(
      engine.config, context, [len(q) for q in engine.question_tokens(items)] + cf,
      engine.prefix_batch(context[0]), engine.question_batch)[1]
  known, test = cost(split.known), cost(split.heldout)
  return known / (known + test)


def composite(record: dict) -> float:
  entry = record["decodings"].get(records.CHOSEN) or record["decodings"]["argmax"]
  return float("nan") if entry["sum"] is None else entry["sum"]


def run_pas(engine, config, subjects, score_log) -> dict:
  timeline = Timeline()
  start = time.perf_counter()
  activations = engine._compute_activations()  # computed, never read from the disk cache
  act_end = time.perf_counter()
  split, items = data.load_split(), data.load_items()
  lengths = [len(prompts.encode_activation_prompt(engine.model.tokenizer, items.text[j], x))
             for j in split.known for x in engine_lib.ACTIVATION_LETTERS]
  act_tokens, act_flops = planner.capture_cost(engine.config, lengths)
  settings = alignment.AlignSettings.from_config(
      config, engine.config.num_layers * engine.config.num_heads)
  t = time.perf_counter()
  results = alignment.align_subjects(engine, activations, subjects, settings,
                                     selections=("kfold_known",), progress=timeline)
  end = time.perf_counter()
  stages = attribute(score_log, timeline.windows(PAS_LABELS, end))
  seconds = dict(results[0].work["stage_seconds"])
  recs = [records.pas_records(r, a, ["pas"])[0]
          for r, a in zip(results, subjects.answers, strict=True)]
  return {
      "activations": {"wall_s": act_end - start, "compile_s": compile_seconds(start, act_end),
                      "flops": act_flops, "tokens": act_tokens},
      "stage_seconds": seconds, "wall_s": end - t,
      "stages": {k: {kk: vv for kk, vv in v.items() if kk != "calls"} for k, v in stages.items()},
      "optimisation": ["probes", "fold_probes", "fold_sweep"], "test": ["test_sweep"],
      "errors": [composite(r) for r in recs],
      "chosen": [{"alpha": r["alpha"].get(records.CHOSEN), "decoding":
                  r["decodings"][records.CHOSEN]["decoding"]} for r in recs]}


def run_dpo(engine, config, subjects, score_log) -> dict:
  timeline = Timeline()
  settings = dpo_lib.DpoSettings.from_config(config)
  t = time.perf_counter()
  results = dpo_lib.align_subjects(engine, subjects, settings, progress=timeline)
  end = time.perf_counter()
  stages = attribute(score_log, timeline.windows(DPO_LABELS, end))
  seconds = dict(results[0].work["stage_seconds"])
  pref = dpo_lib.preference_data(engine)
  rows = results[0].work["rows"]
  executed_rows = parallel.padded_rows(results[0].work["train_shapes"]["rows"], engine.mesh)
  stages.setdefault("train", {"compile_s": 0.0, "flops": 0.0, "tokens": 0})
  stages["train"]["flops"] = dpo_train_flops(engine.config, pref, executed_rows if rows else 0,
                                             settings.max_steps, settings.pairs_per_step)
  stages.setdefault("reference", {"compile_s": 0.0, "flops": 0.0, "tokens": 0})
  stages["reference"]["flops"] = dpo_reference_flops(engine.config, pref) if rows else 0.0
  # The base-model sweep scores the known items (step 0, a candidate) and the test items at
  # once; each side gets its share by FLOPs.
  known_share = base_sweep_split(engine)
  base = stages.pop("base_sweep", {"compile_s": 0.0, "flops": 0.0, "tokens": 0, "calls": []})
  base_s = seconds.pop("base_sweep", 0.0)
  for name, share in (("base_sweep_known", known_share), ("base_sweep_test", 1 - known_share)):
    stages[name] = {"compile_s": base["compile_s"] * share, "flops": base["flops"] * share,
                    "tokens": base["tokens"] * share}
    seconds[name] = base_s * share
  recs = [records.dpo_record(r, a) for r, a in zip(results, subjects.answers, strict=True)]
  return {
      "stage_seconds": seconds, "wall_s": end - t,
      "stages": {k: {kk: vv for kk, vv in v.items() if kk != "calls"} for k, v in stages.items()},
      "optimisation": ["pairs", "base_sweep_known", "reference", "train", "fold_sweep"],
      "test": ["base_sweep_test", "test_sweep"],
      "errors": [composite(r) for r in recs], "rows": rows,
      "max_steps": settings.max_steps, "eval_every": settings.eval_every,
      "pairs_per_step": settings.pairs_per_step, "num_pairs": [r.num_pairs for r in results],
      "chosen": [{"steps": r.chosen_steps, "decoding": r.chosen_decoding,
                  "note": r.note} for r in results],
      "shapes": {"prompt_tokens": int(pref.prompts.shape[1]),
                 "branch_tokens": int(pref.branches.shape[2])}}


def extrapolate_dpo(measured: dict, max_steps: int, eval_every: int) -> dict:
  """Seconds and FLOPs of DPO at other step counts: training's steady time per step and the
  fold sweep's time per snapshot scale; compile time and everything else stay as measured."""
  s, st = measured["stage_seconds"], measured["stages"]
  step_ratio = max_steps / measured["max_steps"]
  snap_ratio = (max_steps // eval_every) / (measured["max_steps"] // measured["eval_every"])
  seconds, flops = dict(s), {k: v["flops"] for k, v in st.items()}
  train_compile = st["train"]["compile_s"]
  seconds["train"] = train_compile + (s["train"] - train_compile) * step_ratio
  flops["train"] = st["train"]["flops"] * step_ratio
  fold_compile = st.get("fold_sweep", {}).get("compile_s", 0.0)
  seconds["fold_sweep"] = fold_compile + (s.get("fold_sweep", 0.0) - fold_compile) * snap_ratio
  flops["fold_sweep"] = st.get("fold_sweep", {}).get("flops", 0.0) * snap_ratio
  return {"stage_seconds": seconds, "flops": flops}


def total(values: dict, names) -> float:
  return sum(values.get(n, 0.0) for n in names)


def report(out: dict) -> str:
  n = out["subjects"]
  pas, dpo, ext = out["pas"], out["dpo"], out["dpo_config"]
  act = pas["activations"]
  pas_opt = total(pas["stage_seconds"], pas["optimisation"]) + act["wall_s"]
  pas_opt_flops = total({k: v["flops"] for k, v in pas["stages"].items()},
                        pas["optimisation"]) + act["flops"]
  pas_test = total(pas["stage_seconds"], pas["test"])
  pas_test_flops = total({k: v["flops"] for k, v in pas["stages"].items()}, pas["test"])
  dpo_flops = {k: v["flops"] for k, v in dpo["stages"].items()}
  dpo_opt, dpo_test = (total(dpo["stage_seconds"], dpo[k]) for k in ("optimisation", "test"))
  dpo_opt_flops, dpo_test_flops = (total(dpo_flops, dpo[k]) for k in ("optimisation", "test"))
  ext_opt = total(ext["stage_seconds"], dpo["optimisation"])
  ext_opt_flops = total(ext["flops"], dpo["optimisation"])
  compile_of = lambda m, names: sum(m["stages"].get(k, {}).get("compile_s", 0.0) for k in names)
  pas_compile = compile_of(pas, pas["optimisation"]) + act["compile_s"]
  dpo_compile = compile_of(dpo, dpo["optimisation"])
  err = lambda xs: f"{np.nanmean(xs):.3f}" if len(xs) else "n/a"
  measured_label = (f"DPO, measured (max_steps={dpo['max_steps']}, eval_every="
                    f"{dpo['eval_every']})")
  config_label = (f"DPO at the config's max_steps={out['config_steps'][0]}, eval_every="
                  f"{out['config_steps'][1]}")
  config_label += (" (= the measured run)" if out["config_steps"] == (dpo["max_steps"],
                                                                      dpo["eval_every"])
                   else " (EXTRAPOLATED from the measured run)")
  per = lambda x: f"{x / n:,.1f}"
  gf = lambda x: f"{x / n / 1e12:,.2f}"
  lines = [
      f"# bench_dpo: {out['model']}, {out['device']}, {os.cpu_count()} CPUs; {n} subject(s) "
      f"{', '.join(out['subject_ids'])}; PAS: {out['pas_settings']}; DPO: {out['dpo_settings']}",
      f"# load average before {out['loads'][0][0]:.2f}/{out['loads'][0][1]:.2f}/"
      f"{out['loads'][0][2]:.2f}, after {out['loads'][1][0]:.2f}/{out['loads'][1][1]:.2f}/"
      f"{out['loads'][1][2]:.2f}; model load {out['load_s']:.1f} s (not counted below)",
      "",
      "| per subject | PAS (honest: alpha by k-fold on the known items) | " + measured_label + " | "
      + config_label + " |",
      "|---|---|---|---|",
      f"| optimisation wall s (compile s) | {per(pas_opt)} ({per(pas_compile)}) | "
      f"{per(dpo_opt)} ({per(dpo_compile)}) | {per(ext_opt)} |",
      f"| optimisation TFLOP | {gf(pas_opt_flops)} | {gf(dpo_opt_flops)} | "
      f"{gf(ext_opt_flops)} |",
      f"| test scoring wall s (TFLOP) | {per(pas_test)} ({gf(pas_test_flops)}) | {per(dpo_test)} "
      f"({gf(dpo_test_flops)}) | same as measured |",
      f"| composite error, headline row (mean over subjects) | {err(pas['errors'])} | "
      f"{err(dpo['errors'])} | not run |",
      f"| PAS / DPO optimisation time | - | {pas_opt / dpo_opt:.2f} | {pas_opt / ext_opt:.2f} |",
      f"| PAS / DPO optimisation FLOPs | - | {pas_opt_flops / dpo_opt_flops:.2f} | "
      f"{pas_opt_flops / ext_opt_flops:.2f} |",
      "",
      f"constant_3 on the same subjects: composite error {err(out['constant_3'])}. Paper "
      f"(Llama-3-8B-Instruct, PAPI, alpha chosen on the test items): PAS {PAPER_ERROR['PAS']}, "
      f"DPO {PAPER_ERROR['DPO']}, PPO {PAPER_ERROR['PPO']}; PAS about "
      f"{PAPER_PAS_OVER_DPO_TIME:.2f} of DPO's time.",
      "",
      "Stages (batch totals, wall s; compile s; TFLOP):",
  ]
  act_row = (f"  PAS activations (once per model): {act['wall_s']:.1f}; {act['compile_s']:.1f}; "
             f"{act['flops'] / 1e12:.2f}")
  lines.append(act_row)
  for name, method in (("PAS", pas), ("DPO", dpo)):
    for stage in method["optimisation"] + method["test"]:
      st = method["stages"].get(stage, {"compile_s": 0.0, "flops": 0.0})
      kind = "optimisation" if stage in method["optimisation"] else "test"
      lines.append(f"  {name} {stage} ({kind}): {method['stage_seconds'].get(stage, 0.0):.1f}; "
                   f"{st['compile_s']:.1f}; {st['flops'] / 1e12:.2f}")
  if out["config_steps"] != (dpo["max_steps"], dpo["eval_every"]):
    lines.append(f"  DPO train at the config's steps (EXTRAPOLATED): "
                 f"{ext['stage_seconds']['train']:.1f}; fold_sweep: "
                 f"{ext['stage_seconds']['fold_sweep']:.1f}")
  lines.append(f"DPO: {dpo['rows']} adapters trained together ({out['dpo_rows_note']}); "
               f"preference pairs per subject {dpo['num_pairs']}; padded prompt "
               f"{dpo['shapes']['prompt_tokens']} and completion {dpo['shapes']['branch_tokens']} "
               f"tokens; chosen: {dpo['chosen']}")
  lines.append(f"PAS chosen: {pas['chosen']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  track_compiles()
  config = _CONFIG.value
  config_steps = (int(config.dpo.max_steps), int(config.dpo.eval_every))
  with config.unlocked():
    if _MODEL.value:
      config.model = _MODEL.value
    config.subjects_per_batch = _SUBJECTS.value
    if _MAX_STEPS.value:
      config.dpo.max_steps = _MAX_STEPS.value
    if _EVAL_EVERY.value:
      config.dpo.eval_every = _EVAL_EVERY.value
  loads = [os.getloadavg()]
  papi = data.load_papi_subjects()
  subjects = papi.select(list(papi.ids[:_SUBJECTS.value]))
  t = time.perf_counter()
  engine = engine_lib.Engine.from_config(config)
  load_s = time.perf_counter() - t
  score_log = ScoreLog(engine)
  print(f"PAS on {len(subjects)} subject(s) ...", file=sys.stderr, flush=True)
  pas = run_pas(engine, config, subjects, score_log)
  print(f"DPO on {len(subjects)} subject(s) ...", file=sys.stderr, flush=True)
  dpo = run_dpo(engine, config, subjects, score_log)
  loads.append(os.getloadavg())
  k = int(config.pas.folds)
  out = {
      "model": engine.source, "device": str(jax.devices()[0].device_kind),
      "subjects": len(subjects), "subject_ids": list(subjects.ids), "loads": loads,
      "load_s": load_s, "pas": pas, "dpo": dpo, "config_steps": config_steps,
      "dpo_config": extrapolate_dpo(dpo, *config_steps),
      "dpo_rows_note": f"{len(subjects)} subject(s) x ({k} folds + all known items)",
      "pas_settings": f"alphas {tuple(config.pas.alphas)}, {k} folds, top_k {config.pas.top_k}",
      "dpo_settings": (f"rank {config.dpo.rank}, targets {config.dpo.targets}, lr "
                       f"{tuple(config.dpo.learning_rates)}, beta {config.dpo.beta}, "
                       f"{config.dpo.pairs_per_step} pairs/step, rejected {config.dpo.rejected}"),
      "constant_3": [records.decoded_record(sid, "constant_3", {"-": p}, a)["decodings"]["-"]["sum"]
                     for sid, p, a in zip(subjects.ids, baselines.predict(
                         "constant_3", subjects.answers), subjects.answers, strict=True)],
  }
  print(report(out))
  if _SAVE_JSON.value:
    with open(_SAVE_JSON.value, "w") as f:
      json.dump(out, f, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))


if __name__ == "__main__":
  app.run(main)
