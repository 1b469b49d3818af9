"""Device check: one prepared command for a short loan of a bare accelerator machine.

Made for a machine with only JAX (with CUDA), flax, optax, orbax-checkpoint, absl-py,
transformers, tokenizers and numpy installed (`BARE_PACKAGES`) and no network. The few pure
packages the project imports beyond those (`CARRIED_WHEELS`) travel as wheels in the ignored
`wheels/` folder (`scripts/fetch_wheels.sh`) and `scripts/device_check.sh` installs the missing
ones into the ignored `.device_site/` before calling this file. No GGUF is read: the weights
are random (`common.random_params`) and the tokenizer is the shipped SmolLM2 one
(`palign_jax/models/shipped_tokenizer.py`).

Owns the check's stages and its two outputs, `OUT_DIR/device_check.json` (everything) and
`OUT_DIR/device_check.txt` (a short summary), both rewritten after every stage, so a run cut
short keeps what it measured. Each stage is guarded: a failure is written into the JSON with
its traceback and the next stage still runs (stages that need a failed one say so).

  environment  Python, package versions, devices, backend, where each carried module came from
  tokenizer    the shipped tokenizer renders the PAPI prompts (option letters, lengths)
  correctness  letter log-probabilities `f32[contexts x alphas, items, 5]` on the default device
               against the CPU in float32 on the same weights (tiny preset and a SmolLM2-shaped
               model): float32 at HIGHEST matmul precision (tolerance `TOLERANCES`), bfloat16
               against float32 on the bf16-rounded weights; records the max abs difference
  setup        random weights of the preset on the mesh, prompt lengths, the planner's plans
  activations  the 240 shared activation forwards
  pas_paper    PAS at the paper's protocol (`oracle_test`: every alpha on the 180 test items)
  pas_honest   PAS at the honest protocol (`kfold_known`: k folds x alphas on the known items,
               then alpha 0 and the chosen alphas on the test items)

Each PAS stage records tokens/s, executed and useful FLOPs (`planner.score_cost` /
`common.useful_score_flops`) and model FLOP utilisation of both against the device's peak,
peak device memory, compile seconds, the planner's estimate beside the measurement, and the
projection to 300 subjects (EXTRAPOLATED). The number of subjects shrinks (halved) where the
planner, scaled by the last measured/planned ratio, says the stage would not finish within
`--budget_s` of the start.

  scripts/device_check.sh /tmp/out                  # H200: llama3_8b, bf16, 64 subjects
  scripts/device_check.sh /tmp/out --preset=tiny    # CPU rehearsal: ~100 s on a busy 2-core
                                                    # CPU, mostly XLA compiles
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the bare machine has (pip names), and what travels as wheels: module -> requirement.
BARE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "transformers",
                 "tokenizers", "numpy")
CARRIED_WHEELS = {
    "gguf": "gguf==0.19.0",  # palign_jax.models.loading and .tokenizer import it at the top
    "ml_collections": "ml_collections==1.1.0",  # configs/default.py
    "jinja2": "jinja2==3.1.6",  # transformers renders chat templates with it
    "markupsafe": "markupsafe==3.0.4",  # jinja2's one dependency (has a compiled speedup)
}
# Max |log p| difference of a letter allowed against the CPU float32 result on the same
# weights. float32 runs at HIGHEST matmul precision (no TF32), so only summation order differs;
# bfloat16 rounds every activation to 8 bits of mantissa (~0.4% relative).
TOLERANCES = {"float32": 2e-3, "bfloat16": 0.15}
DEFAULT_SUBJECTS = {"tiny": 2}  # every other preset: 64
TEST_SUBJECTS = 300  # the projection's target (all PAPI subjects)
# measured/planned assumed before a PAS stage has run on this device: the planner plans 70% of
# the published peak, this assumes half of that, so the first stage is not cut short.
PRIOR_RATIO = 2.0


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default=None, help="where device_check.json/.txt go")
  parser.add_argument("--preset", default="llama3_8b",
                      help="model shape of the PAS stages (common.PRESETS); 'tiny' on a CPU")
  parser.add_argument("--subjects", type=int, default=None,
                      help="PAPI subjects 1..N per PAS stage (default 64; tiny: 2)")
  parser.add_argument("--dtype", default="bfloat16", help="parameter dtype of the PAS stages")
  parser.add_argument("--correctness", default=None,
                      help="comma-separated presets checked against the CPU (default "
                      "'tiny,smollm2'; with --preset=tiny: 'tiny')")
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="seconds from the start the PAS stages should end by (subjects "
                      "shrink to fit)")
  parser.add_argument("--stages", default=None,
                      help="comma-separated subset of the stages (default: all)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense peak per device (default: planner.DEVICES by kind; on a CPU "
                      "a measured float32 matmul)")
  parser.add_argument("--allow_cpu", action="store_true",
                      help="run the PAS stages of a non-tiny preset even without an accelerator")
  parser.add_argument("--list_wheels", action="store_true",
                      help="print the carried wheels' requirements and exit")
  parser.add_argument("--missing_wheels", action="store_true",
                      help="print the requirements of carried modules not importable here")
  parser.add_argument("--unpack_wheels", default=None,
                      help="a wheel folder: unzip the missing carried wheels for this Python "
                      "into --site and exit (scripts/device_check.sh's fallback without pip)")
  parser.add_argument("--site", default=str(ROOT / ".device_site"),
                      help="where --unpack_wheels puts them")
  return parser.parse_args(argv)


STAGES = ("environment", "tokenizer", "correctness", "setup", "activations", "pas_paper",
          "pas_honest")


# --- Imports: nothing beyond the standard library until a stage asks for it. ---

def missing_wheels() -> list[str]:
  """Requirements of the carried modules this interpreter cannot import."""
  return [req for module, req in CARRIED_WHEELS.items()
          if importlib.util.find_spec(module) is None]


def wheel_for(requirement: str, wheel_dir: Path) -> Path:
  """The wheel in `wheel_dir` for `name==version` that this Python can use (pure, or built for
  this CPython's ABI on Linux x86_64)."""
  name, version = requirement.split("==")
  tags = ("py3-none-any", f"cp{sys.version_info[0]}{sys.version_info[1]}-")
  for path in sorted(wheel_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
    if any(tag in path.name for tag in tags):
      return path
  raise FileNotFoundError(f"{wheel_dir}: no wheel of {requirement} for Python "
                          f"{sys.version_info[0]}.{sys.version_info[1]}")


def unpack_wheels(wheel_dir: Path, site: Path) -> list[str]:
  """Installs the missing carried wheels by unzipping them into `site` (a wheel is a zip of
  its importable files and metadata); the names unpacked."""
  import zipfile

  done = []
  for requirement in missing_wheels():
    with zipfile.ZipFile(wheel_for(requirement, wheel_dir)) as wheel:
      wheel.extractall(site)
    done.append(requirement)
  return done


def import_project() -> argparse.Namespace:
  """Every module the stages use (the project's and the third-party ones they import)."""
  sys.path.insert(0, str(ROOT))
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import common
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import default as default_config
  from palign_jax import data, parallel, planner, prompts, scoring
  from palign_jax import engine as engine_lib
  from palign_jax.models import llama, shipped_tokenizer
  from palign_jax.protocol import alignment
  return argparse.Namespace(
      jax=jax, jnp=jnp, np=np, common=common, default_config=default_config, data=data,
      parallel=parallel, planner=planner, prompts=prompts, scoring=scoring,
      engine_lib=engine_lib, shipped_tokenizer=shipped_tokenizer, alignment=alignment,
      llama=llama)


def render_smoke(m, tokenizer=None) -> list[int]:
  """Token ids of one PAPI question turn with the shipped tokenizer (transformers imports
  jinja2 only when it renders a chat template)."""
  tokenizer = tokenizer or m.shipped_tokenizer.load_shipped_tokenizer()
  return m.prompts.encode_question(tokenizer, m.prompts.DEFAULT_SYSTEM_PROMPT,
                                   m.data.load_items().text[0]).suffix


# --- Output: the JSON and the short summary, rewritten after every stage. ---

def _json_default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def write_outputs(result: dict, out_dir: Path) -> None:
  """Atomically rewrites `device_check.json` and `device_check.txt` in `out_dir`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, text in (("device_check.json", json.dumps(result, indent=1, default=_json_default)),
                     ("device_check.txt", summary(result))):
    tmp = out_dir / f".{name}.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, out_dir / name)


def _fmt(x, spec: str = ".3g") -> str:
  return "-" if x is None else format(x, spec)


def summary(result: dict) -> str:
  """A few lines a person reads first: each stage's status and its key numbers."""
  env = result["stages"].get("environment", {})
  lines = [f"device check {result['started']} preset={result['preset']} "
           f"dtype={result['dtype']} backend={env.get('backend', '?')} "
           f"device={env.get('device_kind', '?')} jax={env.get('versions', {}).get('jax', '?')}"]
  for name, stage in result["stages"].items():
    line = f"{name}: {stage.get('status')} ({_fmt(stage.get('seconds'), '.1f')} s)"
    if stage.get("status") in ("failed", "interrupted"):
      line += f" {stage.get('error', '')}"[:300]
    if name == "correctness":
      for check in stage.get("checks", []):
        line += (f"\n  {check['preset']} {check['dtype']}: max|dlogp| "
                 f"{_fmt(check['max_abs_diff'])} (tol {check['tolerance']}) "
                 f"{'ok' if check['ok'] else 'OVER TOLERANCE'}")
    if name == "setup" and "planned_memory_mb" in stage:
      line += (f"\n  prefix batch {stage['prefix_batch']}; planner's memory per device "
               f"{stage['planned_memory_mb']['total']:,.0f} MiB")
    if name.startswith("pas_") and "wall_s" in stage:
      line += (f"\n  {stage['subjects']} subjects: wall {stage['wall_s']:.1f} s (compile "
               f"{stage['compile_s']:.1f} s), {stage['tokens_per_s']:,.0f} tokens/s, MFU "
               f"useful {_fmt(stage['mfu_useful'], '.1%')} / executed "
               f"{_fmt(stage['mfu_executed'], '.1%')}, device peak "
               f"{_fmt(stage['device_peak_mb'], ',.0f')} MiB; planned "
               f"{stage['planned']['seconds']:.0f} s (measured/planned "
               f"{stage['measured_over_planned']:.2f}); 300 subjects "
               f"{stage['projection_300']['seconds'] / 60:.1f} min (EXTRAPOLATED)")
    lines.append(line)
  return "\n".join(lines)


# --- Stages. Each takes the shared state (args, modules, objects of earlier stages) and
# returns a JSON-able dict. ---

def stage_environment(state: dict) -> dict:
  m = state["m"]
  versions = {}
  for dist in BARE_PACKAGES + tuple(r.split("==")[0] for r in CARRIED_WHEELS.values()):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  versions["jax"] = m.jax.__version__
  devices = m.jax.devices()
  stats = devices[0].memory_stats() or {}
  carried = {module: getattr(sys.modules.get(module) or importlib.import_module(module),
                             "__file__", None) for module in CARRIED_WHEELS}
  try:  # the correctness stage's reference needs it (absent under JAX_PLATFORMS=cuda)
    cpu_devices = len(m.jax.devices("cpu"))
  except RuntimeError as err:
    cpu_devices = f"none: {err}"
  return {"python": sys.version, "platform": platform.platform(), "versions": versions,
          "backend": m.jax.default_backend(), "device_kind": devices[0].device_kind,
          "devices": [str(d) for d in devices], "cpu_devices": cpu_devices,
          "bytes_limit": stats.get("bytes_limit"), "carried_modules_from": carried,
          "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS",
                                                 "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                 "XLA_PYTHON_CLIENT_MEM_FRACTION")}}


def stage_tokenizer(state: dict) -> dict:
  m = state["m"]
  start = time.perf_counter()
  tokenizer = m.shipped_tokenizer.load_shipped_tokenizer()
  state["tokenizer"] = tokenizer
  load_s = time.perf_counter() - start
  known = m.data.known_answers(m.data.load_papi_subjects())[:1]
  context = m.prompts.encode_system(tokenizer, m.prompts.few_shot_system_prompt(known[0]))
  return {"load_s": load_s, "vocab": len(tokenizer),
          "option_ids": [int(i) for i in m.prompts.option_token_ids(tokenizer)],
          "question_0_tokens": len(render_smoke(m, tokenizer)),
          "few_shot_context_tokens": len(context)}


def _letter_log_probs(m, params, config, contexts, questions, option_ids, steering,
                      device=None) -> object:
  """`f32[contexts * alphas, items, 5]` from `scoring.score_contexts` on `device` (None: the
  default device), every array it makes placed there."""
  def run():
    steer = m.jnp.asarray(steering)
    return m.np.asarray(m.scoring.score_contexts(
        params, config, contexts, questions, option_ids, steering=steer, question_batch=10,
        prefix_batch=len(contexts) * steering.shape[1]))
  if device is None:
    return run()
  with m.jax.default_device(device):
    return run()


def correctness_check(m, preset: str, items: int = 10, seed: int = 0) -> list[dict]:
  """Letter log-probs of a random `preset` model on the default device, float32 (HIGHEST
  precision) and bfloat16, against the CPU in float32 on the same weights. Two few-shot
  contexts x two alphas (0 and a random steering) x `items` held-out items."""
  jax, jnp, np = m.jax, m.jnp, m.np
  config = m.common.PRESETS[preset]
  cpu = jax.devices("cpu")[0]
  tokenizer = m.shipped_tokenizer.load_shipped_tokenizer()
  head = m.engine_lib._common_prefix(
      [m.prompts.encode_question(tokenizer, m.prompts.DEFAULT_SYSTEM_PROMPT, t).suffix
       for t in m.data.load_items().text])
  known = m.data.known_answers(m.data.load_papi_subjects())[:2]
  contexts = [np.asarray(m.prompts.encode_system(tokenizer, m.prompts.few_shot_system_prompt(a))
                         + head, np.int32) for a in known]
  heldout = m.data.load_split().heldout[:items]
  questions = [np.asarray(m.prompts.encode_question(
      tokenizer, m.prompts.DEFAULT_SYSTEM_PROMPT, m.data.load_items().text[j]).suffix[len(head):],
      np.int32) for j in heldout]
  option_ids = m.prompts.option_token_ids(tokenizer)
  rng = np.random.default_rng(seed)
  steering = np.zeros((len(contexts), 2, config.num_layers, config.num_heads, config.head_dim),
                      np.float32)
  steering[:, 1] = 0.5 * rng.standard_normal(steering[:, 1].shape)

  params = m.common.random_params(config, "float32", seed=seed)
  to_cpu = lambda tree: jax.device_put(tree, cpu)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  references = {
      "float32": _letter_log_probs(m, to_cpu(params), config, contexts, questions, option_ids,
                                   steering, cpu),
      "bfloat16": _letter_log_probs(m, to_cpu(jax.tree.map(lambda x: x.astype(jnp.float32),
                                                           bf16)),
                                    config, contexts, questions, option_ids, steering, cpu)}
  same_device = jax.devices()[0].platform == "cpu"  # a CPU run: float32 is the reference
  if same_device:
    f32 = references["float32"]
  else:
    with jax.default_matmul_precision("highest"):
      f32 = _letter_log_probs(m, params, config, contexts, questions, option_ids, steering)
  # bfloat16 on a GPU runs cuDNN's flash attention ("auto"); a refusal falls back to the
  # einsums with a warning, which the record keeps.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    half = _letter_log_probs(m, bf16, config, contexts, questions, option_ids, steering)
  measured = {"float32": f32, "bfloat16": half}
  attention = {dtype: m.llama.attention_implementation(config, getattr(jnp, dtype))
               for dtype in measured}
  fallbacks = sorted({str(w.message) for w in caught if "attention" in str(w.message)})
  checks = []
  for dtype, got in measured.items():
    ref = references[dtype]
    diff = float(np.max(np.abs(got - ref)))
    finite = bool(np.isfinite(got).all() and np.isfinite(ref).all())
    checks.append({
        "preset": preset, "dtype": dtype, "shape": list(got.shape),
        "attention": attention[dtype],
        "attention_fallback": fallbacks if dtype == "bfloat16" else [],
        "device": str(jax.devices()[0]), "reference": "cpu float32, same weights",
        "max_abs_diff": diff, "tolerance": TOLERANCES[dtype],
        "ok": finite and diff <= TOLERANCES[dtype],
        "argmax_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        # How far the reference letters are apart: a difference well under this is a real check.
        "reference_spread": float(np.max(ref.max(-1) - ref.min(-1))),
        "steering_changes_by": float(np.max(np.abs(ref[1::2] - ref[0::2]))),
        "context_tokens": [len(c) for c in contexts],
        "note": "default device is the CPU: float32 is the reference itself"
        if same_device and dtype == "float32" else ""})
  return checks


def stage_correctness(state: dict) -> dict:
  m, args = state["m"], state["args"]
  presets = args.correctness or ("tiny" if args.preset == "tiny" else "tiny,smollm2")
  checks, errors = [], {}
  for preset in [p.strip() for p in presets.split(",") if p.strip()]:
    try:
      checks += correctness_check(m, preset)
    except Exception as err:  # one preset's failure leaves the other's result
      errors[preset] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
  out = {"checks": checks, "tolerances": TOLERANCES, "errors": errors,
         "all_ok": bool(checks) and not errors and all(c["ok"] for c in checks)}
  if errors and not checks:
    raise RuntimeError(f"every correctness preset failed: {sorted(errors)}; {errors}")
  return out


def stage_setup(state: dict) -> dict:
  m, args = state["m"], state["args"]
  backend = m.jax.default_backend()
  if backend == "cpu" and args.preset != "tiny" and not args.allow_cpu:
    raise RuntimeError(f"no accelerator: JAX's backend is 'cpu' (devices {m.jax.devices()}); "
                       f"the {args.preset} stages would not finish; check the CUDA install, or "
                       "pass --allow_cpu")
  start = time.perf_counter()
  config = m.default_config.get_config()
  model_config = m.common.PRESETS[args.preset]
  config.pas.top_k = min(int(config.pas.top_k), model_config.num_layers * model_config.num_heads)
  mesh = m.parallel.mesh_from_config(config)
  model = m.common.random_model(model_config, args.dtype, mesh)
  m.jax.block_until_ready(model.params)
  params_s = time.perf_counter() - start
  cache = tempfile.mkdtemp(prefix="device_check_cache_")
  engine = m.engine_lib.Engine(model, question_batch=int(config.scoring.question_batch),
                               prefix_batch=int(config.scoring.prefix_batch), mesh=mesh,
                               cache_dir=cache)
  log = m.common.CostLog(engine)
  subjects = args.subjects or DEFAULT_SUBJECTS.get(args.preset, 64)
  all_subjects = m.data.parse_subject_spec(f"0:{subjects}", m.data.load_papi_subjects())
  lengths = m.planner.PromptLengths.measure(engine, m.data.known_answers(all_subjects),
                                            int(config.pas.folds), int(config.seed))
  kind, peak = m.common.device_peak(args.peak_tflops,
                                    matmul_n=1024 if backend == "cpu" else 2048)
  settings = m.alignment.AlignSettings.from_config(
      config, model_config.num_layers * model_config.num_heads)
  state.update(config=config, model_config=model_config, mesh=mesh, engine=engine, log=log,
               lengths=lengths, peak=peak, devices=len(m.jax.local_devices()),
               settings=settings, subjects=subjects, kind=kind)
  prefix_batch = engine.prefix_batch(int(lengths.few_shot.max()))
  memory = m.planner.memory_per_device(
      model_config, dtype_bytes=m.np.dtype(engine.params_dtype).itemsize,
      data=int(mesh.shape["data"]), model=int(mesh.shape["model"]), fsdp=False,
      prefix_batch=prefix_batch,
      context_length=m.scoring.bucket_length(int(lengths.few_shot.max())),
      question_batch=engine.question_batch,
      question_length=m.scoring.bucket_length(int(lengths.heldout.max())))
  return {"random_params_s": params_s, "preset": args.preset, "dtype": args.dtype,
          "model_config": dataclasses.asdict(model_config), "device_kind": kind,
          "peak_flops_per_device": peak, "devices": state["devices"],
          "mesh": dict(mesh.shape), "prefix_batch": prefix_batch,
          "question_batch": engine.question_batch, "alphas": list(settings.alphas),
          "alpha_grid_note": "the fixed grid config.pas.alphas (the paper's); launch.evaluate's "
          "default measures a model_range grid (5 alphas) on real weights",
          "folds": settings.folds, "top_k": settings.fit.top_k,
          "prompt_tokens": {"few_shot_mean": float(lengths.few_shot.mean()),
                            "few_shot_max": int(lengths.few_shot.max()),
                            "heldout_question_mean": float(lengths.heldout.mean()),
                            "activation_prompt_mean": float(lengths.activations.mean())},
          "planned_memory_mb": {k: v / 2**20 for k, v in memory.items()},
          "device_peak_mb": m.common.device_peak_mb()}


def plan(state: dict, subjects: int, protocol: str):
  """The planner's `Plan` for one protocol ("paper" or "honest") at `subjects` in one batch."""
  m, lengths, engine = state["m"], state["lengths"], state["engine"]
  calls = m.planner.protocol_calls(
      lengths, subjects=subjects, subjects_per_batch=subjects,
      alphas=len(state["settings"].alphas), folds=state["settings"].folds,
      oracle=protocol == "paper", honest=protocol == "honest")
  return m.planner.estimate(
      state["model_config"], calls, activation_lengths=lengths.activations,
      prefix_batch=engine.prefix_batch(int(lengths.few_shot.max())),
      question_batch=engine.question_batch, devices=state["devices"],
      peak_flops=state["peak"], throughput=m.planner.throughput_for(state["kind"]))


def stage_activations(state: dict) -> dict:
  m = state["m"]
  engine, lengths, config = state["engine"], state["lengths"], state["model_config"]
  start = time.perf_counter()
  state["activations"] = engine._compute_activations()  # computed here, never from a cache
  end = time.perf_counter()
  tokens, flops = m.planner.capture_cost(config, lengths.activations, 16 * engine.data_shards)
  useful = m.common.useful_capture_flops(config, lengths.activations)
  row = m.common.stage("activations", start, end, tokens=tokens, flops=flops)
  state["activations_s"] = row["wall_s"]
  steady = m.common.steady(row)
  peak = state["devices"] * state["peak"]
  return {**row, "useful_flops": useful, "tokens_per_s": tokens / steady,
          "mfu_executed": flops / steady / peak, "mfu_useful": useful / steady / peak,
          "device_peak_mb": m.common.device_peak_mb()}


def fit_subjects(state: dict, protocol: str, requested: int) -> tuple[int, float, str]:
  """The most subjects (requested, halved until it fits) whose planned time, scaled by the
  last measured/planned ratio, ends within the budget; (subjects, predicted s, note)."""
  ratio = state.get("measured_over_planned", PRIOR_RATIO)
  remaining = state["args"].budget_s - (time.perf_counter() - state["t0"])
  subjects = requested
  predicted = ratio * plan(state, subjects, protocol).seconds
  while subjects > 1 and predicted > remaining:
    subjects //= 2
    predicted = ratio * plan(state, subjects, protocol).seconds
  note = "" if subjects == requested else (
      f"shrunk from {requested}: {remaining:.0f} s of the budget left, planned x "
      f"{ratio:.2f} predicted more")
  return subjects, predicted, note


def run_protocol(state: dict, protocol: str) -> dict:
  """PAS for the state's subjects at one protocol, measured and set beside the plan."""
  m, engine, log = state["m"], state["engine"], state["log"]
  selection = {"paper": "oracle_test", "honest": "kfold_known"}[protocol]
  subjects, predicted, note = fit_subjects(state, protocol, state["subjects"])
  batch = m.data.parse_subject_spec(f"0:{subjects}", m.data.load_papi_subjects())
  programs_before = sum(m.scoring.compiled_programs().values())
  start = time.perf_counter()
  aligned = m.alignment.align_subjects(engine, state["activations"], batch, state["settings"],
                                       selections=(selection,))
  end = time.perf_counter()
  totals = log.totals(start, end)
  calls = [c for c in log.calls if c["start"] >= start and c["end"] <= end]
  row = m.common.stage(f"pas_{protocol}", start, end, tokens=totals["tokens"],
                       flops=totals["flops"], subjects=subjects)
  steady = m.common.steady(row)
  scoring_steady = max(sum(c["end"] - c["start"] - c["compile_s"] for c in calls), 1e-9)
  peak = state["devices"] * state["peak"]
  planned = plan(state, subjects, protocol)
  measured = state["activations_s"] + row["wall_s"]
  state["measured_over_planned"] = measured / planned.seconds
  per_subject = steady / subjects
  projected = state["activations_s"] + row["compile_s"] + per_subject * TEST_SUBJECTS
  planned_300 = plan(state, TEST_SUBJECTS, protocol)
  return {
      **row, "selection": selection, "subjects": subjects, "subjects_requested":
      state["subjects"], "subjects_note": note, "predicted_s": predicted,
      "stage_seconds": aligned[0].work.get("stage_seconds", {}),
      "scoring_calls": len(calls), "scoring_steady_s": scoring_steady,
      "programs_compiled": sum(m.scoring.compiled_programs().values()) - programs_before,
      "executed_flops": totals["flops"], "useful_flops": totals["useful_flops"],
      "useful_over_executed": totals["useful_flops"] / max(totals["flops"], 1.0),
      "tokens_per_s": totals["tokens"] / steady,
      "mfu_executed": totals["flops"] / steady / peak,
      "mfu_useful": totals["useful_flops"] / steady / peak,
      "mfu_executed_scoring_only": totals["flops"] / scoring_steady / peak,
      "peak_flops_per_device": state["peak"], "device_peak_mb": m.common.device_peak_mb(),
      "planned": {"seconds": planned.seconds, "flops": planned.flops, "tokens": planned.tokens,
                  "programs": planned.programs, "covers": "activations + this protocol's "
                  "scoring calls (probe fits not planned)"},
      "measured_with_activations_s": measured,
      "measured_over_planned": state["measured_over_planned"],
      "per_subject_steady_s": per_subject,
      "projection_300": {
          "label": "EXTRAPOLATED", "seconds": projected,
          "how": f"activations + this stage's compile + {TEST_SUBJECTS} x the steady "
          f"per-subject time measured at {subjects} subjects in one batch",
          "planner_seconds": planned_300.seconds}}


def stage_pas_paper(state: dict) -> dict:
  return run_protocol(state, "paper")


def stage_pas_honest(state: dict) -> dict:
  return run_protocol(state, "honest")


NEEDS = {"setup": ("tokenizer",), "activations": ("setup",),
         "pas_paper": ("activations",), "pas_honest": ("activations",)}
RUNNERS: dict[str, Callable[[dict], dict]] = {
    "environment": stage_environment, "tokenizer": stage_tokenizer,
    "correctness": stage_correctness, "setup": stage_setup, "activations": stage_activations,
    "pas_paper": stage_pas_paper, "pas_honest": stage_pas_honest}


def run_stage(name: str, state: dict, result: dict, out_dir: Path) -> None:
  """Runs one stage, recording its outcome whatever happens, and rewrites the outputs."""
  record = {"status": "running"}
  result["stages"][name] = record
  blocked = [n for n in NEEDS.get(name, ()) if result["stages"].get(n, {}).get("status") != "ok"]
  if blocked:
    record.update(status="skipped", error=f"needs {blocked}, which did not succeed")
    write_outputs(result, out_dir)
    return
  write_outputs(result, out_dir)
  print(f"[device_check] {name} ...", flush=True)
  start = time.perf_counter()
  try:
    record.update(RUNNERS[name](state))
    record["status"] = "ok"
  except Exception as err:
    record.update(status="failed", error=f"{type(err).__name__}: {err}",
                  traceback=traceback.format_exc(limit=12))
  except BaseException as err:  # SIGTERM (a timeout), ^C: say so, then stop
    record.update(status="interrupted", error=f"{type(err).__name__}: {err}")
    raise
  finally:
    record["seconds"] = time.perf_counter() - start
    write_outputs(result, out_dir)
  print(f"[device_check] {name}: {record['status']} ({record['seconds']:.1f} s)"
        + (f" {record.get('error', '')}" if record["status"] != "ok" else ""), flush=True)


def _terminate(signum, _frame):
  raise SystemExit(128 + signum)


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.list_wheels or args.missing_wheels:
    print(" ".join(CARRIED_WHEELS.values() if args.list_wheels else missing_wheels()))
    return None
  if args.unpack_wheels:
    print(f"[device_check] unpacked into {args.site}: "
          f"{unpack_wheels(Path(args.unpack_wheels), Path(args.site))}")
    return None
  if not args.out_dir:
    raise SystemExit("device_check: --out_dir is required")
  out_dir = Path(args.out_dir)
  signal.signal(signal.SIGTERM, _terminate)
  result = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": sys.argv, "preset": args.preset, "dtype": args.dtype,
            "missing_carried_modules": missing_wheels(), "stages": {}}
  state = {"args": args, "t0": time.perf_counter()}
  try:
    state["m"] = import_project()
    state["m"].common.track_compiles()
  except Exception as err:  # nothing can run; the JSON says why
    result["import_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=12)}"
    write_outputs(result, out_dir)
    print(result["import_error"], file=sys.stderr)
    return result
  stages = STAGES if not args.stages else tuple(s.strip() for s in args.stages.split(","))
  unknown = [s for s in stages if s not in RUNNERS]
  if unknown:
    raise SystemExit(f"device_check: unknown stages {unknown}; choose from {STAGES}")
  for name in stages:
    run_stage(name, state, result, out_dir)
  result["total_s"] = time.perf_counter() - state["t0"]
  result["ok"] = all(s.get("status") == "ok" for s in result["stages"].values()) and \
      result["stages"].get("correctness", {}).get("all_ok", True)
  write_outputs(result, out_dir)
  print(summary(result), flush=True)
  return result


if __name__ == "__main__":
  main()
