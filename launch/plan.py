"""Plans a PAS / evaluation run before anything is queued: FLOPs, memory per device, time.

    python -m launch.plan --model=llama3_8b --subjects=300 --device=H200
    python -m launch.plan --model=llama3_8b --subjects=300 --device=H200 \\
        --measured=out/device_check.json        # the device check's efficiency and compiles
    python -m launch.plan --model=llama3_70b --subjects=1000 --device=H100 --devices=8 \\
        --config.mesh.model=8 --config.dtype=bfloat16
    python -m launch.plan --model=/path/to/hf_folder --subjects=300     # on this machine

Needs only the model's config (a preset, or a .gguf / Hugging Face folder read without its
weights), the run config (the same --config as launch.evaluate: methods, alpha grid, folds,
batch sizes, mesh, dtype) and the target devices (this machine's by default; a CPU's matmul
peak is measured in a second). Prompt lengths are measured with the embedded SmolLM2
tokenizer, on the first PAPI subjects' answers and descriptions. Every model method of the
config is priced: zero-shot, P² (personality_prompt), the alpha grid's measurement, the honest
folds and the test sweep, and the shared activations. A model that does not fit the devices'
memory is reported here, before anything is loaded. The time is executed FLOPs / (devices x
peak x efficiency) + compiled programs x compile seconds, each labelled measured (the CPU's,
or a device check's JSON given with --measured) or assumed (`planner.ACCELERATOR_THROUGHPUT`).
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

from absl import flags

from palign_jax import data, planner, scoring
from palign_jax.errors import UserInputError

_CONFIG = common.config_flag()
_MODEL = common.shorthand_flag(
    "model", f"a preset ({', '.join(planner.PRESETS)}) or {common.MODEL_HELP} Only the model's "
    "config is read, never its weights.")
_SUBJECTS = flags.DEFINE_integer("subjects", 300, "How many subjects the run aligns.")
_DEVICE = flags.DEFINE_string(
    "device", None, f"Plan for this kind of device ({', '.join(planner.DEVICES)}, or 'cpu'); "
    "default: this machine's. A known kind's published bf16 peak and memory are used.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Devices per process (default: this machine's count, or the mesh's size "
    "with --device).")
_PROCESSES = flags.DEFINE_integer(
    "processes", 1, "Processes (hosts). Independent mode (default): they share the subjects, "
    "each over --devices of its own. Pod mode (--config.distributed.mode=pod): one mesh over "
    "all their devices (--devices is then the total), every subject on it.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device in the run's "
                           "dtype (overrides the device table or the measured CPU peak).")
_MEMORY = flags.DEFINE_float("memory_gb", None, "Memory per device in GiB (overrides the table).")
_MEASURED = flags.DEFINE_string(
    "measured", None, "A device check's device_check.json (benchmarks/device_check.py) from "
    "the planned kind of device: its measured efficiency and compile seconds replace the "
    "assumed ones. Without it an accelerator is planned at planner.ACCELERATOR_THROUGHPUT, "
    "labelled assumed.")
flags.adopt_module_key_flags(common)  # --help lists --config and --model too


def model_config(spec: str):
  """The ModelConfig of a preset or a checkpoint's config (weights are not read)."""
  if spec in planner.PRESETS:
    return planner.PRESETS[spec], spec
  from palign_jax.models import gguf, hf_loader, loading

  kind, path = loading.resolve_spec(spec)
  if kind == "gguf":
    return gguf.config_from_gguf(gguf.open_gguf(path), str(path)), str(path)
  return hf_loader.read_config(path), str(path)


def target(config) -> tuple[str, int, float, float]:
  """(kind, devices per process, peak FLOP/s, memory bytes per device)."""
  import os

  import jax

  kind = _DEVICE.value or jax.devices()[0].device_kind
  known = next((v for k, v in planner.DEVICES.items() if k.lower() in kind.lower()), None)
  mesh_size = None
  if int(config.mesh.data) > 0:
    mesh_size = int(config.mesh.data) * int(config.mesh.model)
  devices = _DEVICES.value or (mesh_size or 1 if _DEVICE.value else jax.local_device_count())
  if known:
    peak, memory = known[0] * 1e12, known[1] * 2**30
  elif kind.lower() == "cpu" and jax.devices()[0].platform == "cpu":
    peak = planner.matmul_peak(dtype=config.dtype) / jax.local_device_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()
  elif not (_PEAK.value and _MEMORY.value):
    raise UserInputError(f"--device: no published peak or memory for {kind!r}; give "
                         "--peak_tflops and --memory_gb")
  if _PEAK.value:
    peak = _PEAK.value * 1e12
  if _MEMORY.value:
    memory = _MEMORY.value * 2**30
  return kind, devices, peak, memory


def throughput(kind: str) -> planner.Throughput:
  """The measured throughput in --measured's JSON (for this kind only), else the table's."""
  if not _MEASURED.value:
    return planner.throughput_for(kind)
  import json
  import pathlib

  path = pathlib.Path(_MEASURED.value)
  try:
    measured_kind, measured = planner.measured_throughput(json.loads(path.read_text()))
  except (OSError, ValueError, KeyError) as err:
    raise UserInputError(f"--measured: cannot read a device check from {path} ({err})") from err
  if not (kind.lower() in measured_kind.lower() or measured_kind.lower() in kind.lower()):
    raise UserInputError(f"--measured: {path} measured {measured_kind!r}, not the planned "
                         f"{kind!r}; plan with --device={measured_kind!r} or leave it out")
  return measured


def prompt_lengths(config, subjects: int) -> planner.PromptLengths:
  from palign_jax import engine as engine_lib
  from palign_jax.models import gguf, loading, tokenizer

  stand_in = loading.LoadedModel(
      config=planner.PRESETS["smollm2"], params={},
      tokenizer=tokenizer.tokenizer_from_gguf(gguf.default_gguf_path()),
      fingerprint="plan", source="plan")
  engine = engine_lib.Engine(stand_in, question_batch=int(config.scoring.question_batch),
                             prefix_batch=1)
  papi = data.load_papi_subjects()
  first = min(subjects, 32)  # the lengths vary little
  descriptions = data.load_descriptions()
  return planner.PromptLengths.measure(
      engine, data.known_answers(papi)[:first], int(config.pas.folds), int(config.seed),
      descriptions=[descriptions[i] for i in papi.ids[:first] if i in descriptions])


def alpha_count(config) -> int:
  """Alphas in the grid: 0 and alpha_max x each fraction for "model_range", else the list."""
  if str(config.pas.alpha_grid) == "model_range":
    return 1 + len(config.pas.range.fractions)
  return len(config.pas.alphas)


def run_parts(config, lengths: planner.PromptLengths, subjects: int) -> dict[str, list]:
  """The scoring calls of the config's model methods, by part of the run (empty parts left
  out), as `launch.evaluate` makes them for `subjects` subjects."""
  methods = str(config.methods).split(",")
  oracle, honest = "pas_oracle_test" in methods, "pas" in methods or "few_shot" in methods
  common_args = dict(subjects=subjects, subjects_per_batch=int(config.subjects_per_batch),
                     alphas=alpha_count(config), folds=int(config.pas.folds), oracle=False,
                     honest=False)
  parts = {
      "zero-shot": planner.protocol_calls(lengths, **common_args,
                                          zero_shot="zero_shot" in methods),
      "P² (personality_prompt)": planner.protocol_calls(
          lengths, **common_args, personality_prompt="personality_prompt" in methods),
      "PAS: folds and test sweep": planner.protocol_calls(
          lengths, **dict(common_args, oracle=oracle, honest=honest)),
  }
  if (oracle or honest) and str(config.pas.alpha_grid) == "model_range":
    reference = len(data.parse_subject_spec(str(config.pas.range.subjects),
                                            data.load_papi_subjects()).ids)
    parts["PAS: alpha grid (once per model)"] = [planner.alpha_range_call(
        lengths, reference_subjects=reference, probe_alphas=len(config.pas.range.probe_alphas),
        items=5 * int(config.pas.range.items_per_trait))]
  return {name: calls for name, calls in parts.items() if calls}


def part_flops(model, lengths: planner.PromptLengths, parts: dict[str, list],
               prefix_batch: int, question_batch: int) -> dict[str, tuple[float, float]]:
  """(executed, useful) FLOPs of the shared activations and of each part of the run."""
  rows = {"shared activations": (planner.capture_cost(model, lengths.activations)[1],
                                 planner.useful_capture_flops(model, lengths.activations))}
  for name, calls in parts.items():
    rows[name] = (sum(planner.score_cost(model, ctx, q, prefix_batch, question_batch)[1]
                      for ctx, q in calls),
                  sum(planner.useful_score_flops(model, ctx, q) for ctx, q in calls))
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  config = common.resolved_config(_CONFIG, model=_MODEL.value)
  model, source = model_config(str(config.model))
  if _SUBJECTS.value < 1:
    raise UserInputError(f"--subjects: {_SUBJECTS.value} is not a positive count")
  kind, devices, peak, memory = target(config)
  model_axis = int(config.mesh.model)
  data_axis = int(config.mesh.data) if int(config.mesh.data) > 0 else devices // model_axis
  if data_axis * model_axis != devices:
    raise UserInputError(f"config.mesh: data={config.mesh.data} x model={model_axis} does not "
                         f"fill {devices} devices")
  dtype_bytes = 2 if config.dtype in ("bfloat16", "float16") else 4
  lengths = prompt_lengths(config, _SUBJECTS.value)
  question_batch = int(config.scoring.question_batch)
  context = scoring.bucket_length(int(lengths.few_shot.max()))
  question = scoring.bucket_length(int(lengths.heldout.max()))
  pod = _PROCESSES.value > 1 and common.distributed_mode(config) == "pod"
  # Pod mode: one program over every process's devices, all subjects; independent: shares.
  per_process = _SUBJECTS.value if pod else -(-_SUBJECTS.value // _PROCESSES.value)
  prefix_batch = int(config.scoring.prefix_batch)
  if not prefix_batch:  # as Engine.prefix_batch sizes it on an accelerator (1 on a CPU)
    params = planner.param_bytes_per_device(model, dtype_bytes, data_axis, model_axis,
                                            bool(config.mesh.fsdp))
    prefix_batch = 1 if "cpu" in kind.lower() else data_axis * scoring.auto_prefix_batch(
        model, context, question_batch, question, max(0.5 * (memory - params), 2**28),
        dtype_bytes)
  parts = run_parts(config, lengths, per_process)
  rate = throughput(kind)
  plan = planner.estimate(model, [c for calls in parts.values() for c in calls],
                          activation_lengths=lengths.activations, prefix_batch=prefix_batch,
                          question_batch=question_batch, devices=devices, peak_flops=peak,
                          throughput=rate)
  attention = planner.attention_for(kind, str(config.dtype))
  mem = planner.memory_per_device(
      model, dtype_bytes=dtype_bytes, data=data_axis, model=model_axis,
      fsdp=bool(config.mesh.fsdp), prefix_batch=prefix_batch, context_length=context,
      question_batch=question_batch, question_length=question, attention=attention)
  gib = lambda b: f"{b / 2**30:,.2f} GiB"
  print(f"# plan: {source} ({model.num_layers} layers, hidden {model.hidden_size}, "
        f"{config.dtype}), {_SUBJECTS.value} subjects over {_PROCESSES.value} process(es) x "
        f"{devices} {kind} (mesh data={data_axis} x model={model_axis}"
        f"{', fsdp' if config.mesh.fsdp else ''}); methods {config.methods}")
  methods = str(config.methods).split(",")
  print(f"protocol: {alpha_count(config)} alphas ({config.pas.alpha_grid} grid), "
        f"{config.pas.folds} folds{', oracle sweep' if 'pas_oracle_test' in methods else ''}; "
        f"prefix batch {prefix_batch}, question batch {question_batch}; few-shot contexts "
        f"{int(lengths.few_shot.min())}-{int(lengths.few_shot.max())} tokens, P² contexts "
        f"{int(lengths.description.min())}-{int(lengths.description.max())}; {attention} "
        "attention")
  device_time = lambda flops: flops / (devices * peak * rate.efficiency)
  print("\n| part of the run | executed PFLOP | useful PFLOP | compute min |\n|---|---|---|---|")
  for name, (executed, useful) in part_flops(model, lengths, parts, prefix_batch,
                                             question_batch).items():
    print(f"| {name} | {executed / 1e15:,.3f} | {useful / 1e15:,.3f} | "
          f"{device_time(executed) / 60:,.1f} |")
  print("\n| per process | value |\n|---|---|")
  print(f"| useful FLOPs (what the protocol needs) | {plan.useful_flops / 1e15:,.3f} PFLOP |")
  print(f"| executed FLOPs (padding, masked keys) | {plan.flops / 1e15:,.3f} PFLOP "
        f"({plan.useful_flops / plan.flops:.0%} useful) |")
  print(f"| tokens (real) | {plan.tokens / 1e6:,.2f} M |")
  print(f"| compiled scoring programs | {plan.programs} |")
  origin = "given" if _PEAK.value else "measured" if "cpu" in kind.lower() else "published"
  print(f"| peak per device | {peak / 1e12:,.4g} TFLOP/s ({origin}) |")
  print(f"| efficiency (executed FLOP/s / peak) | {rate.efficiency:.0%} ({rate.label}) |")
  print(f"| compile per program | {rate.compile_s:,.1f} s ({rate.label}) |")
  print(f"| estimated time | {plan.seconds / 60:,.1f} min: compute "
        f"{plan.compute_seconds / 60:,.1f} + compile {plan.compile_seconds / 60:,.1f} "
        f"({plan.seconds / per_process:,.1f} s per subject) |")
  print(f"| MFU (useful FLOPs) | {plan.mfu(peak):.0%} |")
  print(f"\n{rate.label}: {rate.source}")
  print("\n| memory per device | bytes |\n|---|---|")
  for key in ("params", "kv_cache", "activations", "total"):
    print(f"| {key.replace('_', ' ')} | {gib(mem[key])} |")
  print(f"| available | {gib(memory)} |")
  if mem["total"] > memory:
    need = max(-(-int(mem["params"] * model_axis) // int(0.8 * memory)), model_axis * 2)
    # Tensor parallelism only splits what the axis divides: suggest a size that divides heads.
    ways = next(w for w in range(need, model.num_heads + 1)
                if model.num_heads % w == 0) if need <= model.num_heads else need
    hints = [f"--config.mesh.model={ways}", "--config.mesh.fsdp=True"]
    if config.dtype == "float32":
      hints.append("--config.dtype=bfloat16")
    per_host = devices // _PROCESSES.value if pod else devices
    if planner.needs_pod(model, dtype_bytes, per_host, memory):
      hints.append("and, as it does not fit one host's devices, pod mode over several hosts: "
                   "--config.distributed.mode=pod --processes=N --devices=<all hosts' devices>")
    raise UserInputError(
        f"the model does not fit: {gib(mem['total'])} per device > {gib(memory)}; split the "
        f"parameters over more devices ({', '.join(hints)}) or use a smaller "
        "--config.scoring.prefix_batch")
  print("\nfits: yes")
  print_scale_out(config, model, kind, devices, memory, dtype_bytes, model_axis, pod,
                  question_batch * question)


def print_scale_out(config, model, kind: str, devices: int, memory: float, dtype_bytes: int,
                    model_axis: int, pod: bool, rows: int) -> None:
  """How the processes share the run (pod or independent) and what crosses hosts."""
  processes = _PROCESSES.value
  per_host = devices // processes if pod else devices
  traffic = planner.tensor_parallel_traffic(model, model_axis, per_host, rows, dtype_bytes)
  print(f"\nscale-out: {processes} process(es), mode "
        f"{common.distributed_mode(config) if processes > 1 else '-'}; per host "
        f"{per_host} x {kind}, {per_host * memory / 2**30:,.0f} GiB")
  if traffic["all_reduces"]:
    where = "across hosts" if traffic["cross_host"] else "within a host"
    print(f"tensor parallel: {traffic['all_reduces']} all-reduces per layer of "
          f"{traffic['bytes_each'] / 2**20:,.1f} MiB each (a question batch), {where}")
  if planner.needs_pod(model, dtype_bytes, per_host, memory):
    print("this model does not fit one host: run it in pod mode "
          "(--config.distributed.mode=pod) with the mesh over several hosts")


if __name__ == "__main__":
  common.run(main)
