"""Benchmark: PAS at the paper's protocol on an accelerator, Llama-3-8B-shaped, random weights.

Made for one short run on a GPU or TPU with no network (no checkpoint to download): the
parameters are drawn at random in bfloat16 straight onto the device mesh
(`parallel.param_shardings`, the same placement `launch.evaluate` loads a real model into), the
prompts are tokenised with the shipped SmolLM2 tokenizer
(`palign_jax/models/shipped_tokenizer.py`; its ids are valid Llama-3 ids; real Llama-3 prompts
are ~10% shorter), and the pipeline is the project's own:

1. the shared activations (240 forwards over the 120 known items);
2. the probe fit, kept heads, directions and sigma for every subject at once;
3. the alpha sweep at the paper's protocol (`oracle_test`: every alpha on the 180 held-out
   items, few-shot context of each subject), all subjects in one `align_subjects` call, the
   prefix batch sized to the device's memory (`scoring.auto_prefix_batch`).

Prints a table (wall, compile, tokens/s, TFLOP, model FLOP utilisation against the device's
published dense bf16 peak, peak device memory), the planner's estimate for the same work with
the measured/planned ratio, and the projected time for 300 subjects (the measured steady
per-subject sweep time x 300 + activations + compilation: EXTRAPOLATED). Random weights make
the letters meaningless; the time does not depend on them.

  python benchmarks/bench_accelerator.py                      # H200: ~3-4 min
  python benchmarks/bench_accelerator.py --preset=tiny --subjects=4 --dtype=float32   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402  (same directory)

from configs import default as default_config  # noqa: E402
from palign_jax import data, parallel, planner  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402
from palign_jax.models import loading  # noqa: E402
from palign_jax.models.config import ModelConfig  # noqa: E402
from palign_jax.protocol import alignment  # noqa: E402

PRESETS = common.PRESETS


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="llama3_8b", choices=sorted(PRESETS),
                      help="model shape (random weights); 'tiny' for a CPU smoke run")
  parser.add_argument("--subjects", type=int, default=64, help="PAPI subjects 1..N, one batch")
  parser.add_argument("--dtype", default="bfloat16", choices=loading.DTYPES,
                      help="parameter dtype")
  parser.add_argument("--alphas", default=None,
                      help="comma-separated alphas (default: configs/default.py's six)")
  parser.add_argument("--question_batch", type=int, default=None,
                      help="questions per compiled call (default: the config's)")
  parser.add_argument("--prefix_batch", type=int, default=0,
                      help="(subject, alpha) contexts per call; 0 = sized to device memory")
  parser.add_argument("--mesh_model", type=int, default=1,
                      help="tensor-parallel ways (config.mesh.model); data takes the rest")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense peak per device in --dtype (default: planner.DEVICES by "
                      "device kind; on a CPU, a measured float32 matmul)")
  parser.add_argument("--save_json", default=None, help="also write the results here")
  return parser.parse_args(argv)


def device_peak(args) -> tuple[str, float]:
  """(device kind, peak FLOP/s per device)."""
  return common.device_peak(args.peak_tflops)


def random_model(config: ModelConfig, dtype: str, mesh) -> loading.LoadedModel:
  """Random parameters (scaled like an initialised model) drawn on the mesh, leaf by leaf, and
  the shipped SmolLM2 tokenizer (`common.random_model`)."""
  return common.random_model(config, dtype, mesh)


def main(argv=None) -> dict:
  args = parse_args(argv)
  common.track_compiles()
  config = default_config.get_config()
  if args.alphas:
    config.pas.alphas = tuple(float(a) for a in args.alphas.split(","))
  if args.question_batch:
    config.scoring.question_batch = args.question_batch
  config.mesh.model = args.mesh_model
  model_config = PRESETS[args.preset]
  config.pas.top_k = min(int(config.pas.top_k), model_config.num_layers * model_config.num_heads)
  kind, peak = device_peak(args)
  devices = len(jax.local_devices())
  print(f"# {args.preset} ({model_config.num_layers} layers, hidden {model_config.hidden_size}), "
        f"{args.dtype}, random weights; {args.subjects} subjects; {devices} x {kind}, peak "
        f"{peak / 1e12:.1f} TFLOP/s each; load {os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)

  mesh = parallel.mesh_from_config(config)
  start = time.perf_counter()
  model = random_model(model_config, args.dtype, mesh)
  jax.block_until_ready(model.params)
  rows = [common.stage("random params on the mesh", start, time.perf_counter())]
  engine = engine_lib.Engine(model, question_batch=int(config.scoring.question_batch),
                             prefix_batch=args.prefix_batch, mesh=mesh)
  log = common.ScoreLog(engine)
  subjects = data.parse_subject_spec(f"0:{args.subjects}", data.load_papi_subjects())
  lengths = planner.PromptLengths.measure(engine, data.known_answers(subjects),
                                          int(config.pas.folds), int(config.seed))

  start = time.perf_counter()
  activations = engine._compute_activations()  # computed here, never read from a cache
  tokens, flops = planner.capture_cost(model_config, lengths.activations,
                                       16 * engine.data_shards)
  rows.append(common.stage("activations (240 prompts)", start, time.perf_counter(),
                           tokens=tokens, flops=flops))

  settings = alignment.AlignSettings.from_config(
      config, model_config.num_layers * model_config.num_heads)
  start = time.perf_counter()
  aligned = alignment.align_subjects(engine, activations, subjects, settings,
                                     selections=("oracle_test",))
  end = time.perf_counter()
  seconds = aligned[0].work["stage_seconds"]
  sweep = log.totals(start, end)
  probe_s = seconds.get("probes", 0.0)
  rows.append({**common.stage("probes (all subjects)", start, start + probe_s),
               "subjects": args.subjects})
  rows.append(common.stage(f"oracle sweep ({len(settings.alphas)} alphas x 180 items)",
                           end - seconds.get("test_sweep", 0.0), end, tokens=sweep["tokens"],
                           flops=sweep["flops"], subjects=args.subjects))

  print("| stage | wall s | compile s | steady s/subject | tokens/s | TFLOP | MFU | "
        "device peak MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    steady = common.steady(r)
    rate = r["flops"] / steady / (devices * peak) if r["flops"] else None
    memory = "-" if r["device_mb"] is None else f"{r['device_mb']:,.0f}"
    print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
          f"{steady / r['subjects']:.2f} | {r['tokens'] / steady:,.0f} | {r['flops'] / 1e12:.1f} | "
          f"{'-' if rate is None else f'{rate:.0%}'} | "
          f"{memory} |")

  prefix_batch = engine.prefix_batch(int(lengths.few_shot.max()))
  calls = planner.protocol_calls(lengths, subjects=args.subjects,
                                 subjects_per_batch=args.subjects,
                                 alphas=len(settings.alphas), folds=int(config.pas.folds),
                                 oracle=True, honest=False)
  plan = planner.estimate(model_config, calls, activation_lengths=lengths.activations,
                          prefix_batch=prefix_batch, question_batch=engine.question_batch,
                          devices=devices, peak_flops=peak,
                          throughput=planner.throughput_for(kind))
  measured = rows[1]["wall_s"] + rows[3]["wall_s"]
  sweep_row = rows[3]
  per_subject = common.steady(sweep_row) / args.subjects
  projected = (rows[1]["wall_s"] + per_subject * 300 + sweep_row["compile_s"]
               + probe_s / args.subjects * 300)
  print(f"\nprefix batch {prefix_batch}, question batch {engine.question_batch}; "
        f"planner: {plan.seconds:.0f} s for activations + sweep ({plan.programs} programs), "
        f"measured {measured:.0f} s: ratio measured/planned {measured / plan.seconds:.2f}")
  print(f"300 subjects at this protocol: {projected / 60:.1f} min (EXTRAPOLATED from the "
        f"{args.subjects} measured: steady sweep {per_subject:.2f} s/subject)")
  result = {"preset": args.preset, "dtype": args.dtype, "device": kind, "devices": devices,
            "peak_flops": peak, "subjects": args.subjects, "prefix_batch": prefix_batch,
            "question_batch": engine.question_batch, "rows": rows,
            "planned_s": plan.seconds, "measured_s": measured,
            "projected_300_s": projected}
  if args.save_json:
    with open(args.save_json, "w") as f:
      json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  main()
