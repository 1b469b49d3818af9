"""The cost model: FLOPs, memory per device and time of a PAS run, from shapes alone.

Owns what a run costs before it runs: the FLOPs the scoring programs execute (`layer_flops`,
`score_cost`) beside the FLOPs the protocol needs (`useful_score_flops`), the run's plan of
scoring calls (`protocol_calls`: zero-shot, P², the honest folds and the test sweep), memory
per device on a mesh (`memory_per_device`), how fast each kind of device runs these programs
and how sure that is (`Throughput`: measured, or assumed until a device check measures it) and
a time estimate (`estimate`). It needs a `ModelConfig` (presets `PRESETS`, or a GGUF / Hugging
Face config read without its weights) and the token lengths of the prompts, measured with the
embedded SmolLM2 tokenizer (other tokenizers give lengths within a few tens of percent; the
estimate says it is an estimate).

Executed FLOPs are those the programs run: matmuls (2 m n k) and attention over every key
slot, padding and the masked half of a causal block included; elementwise work is not counted.
Useful FLOPs are what the protocol needs at least: every real token once, attending only to
the keys the causal mask lets it see. Model FLOP utilisation (MFU) is stated on useful FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from palign_jax import parallel, scoring
from palign_jax.models import params as params_lib
from palign_jax.models.config import ModelConfig, RopeScaling


def _gemma3(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            head_dim: int, window: int = 1024, rope_factor: float = 1.0,
            max_positions: int = 131072, query_pre_attn_scalar: float = 256.0) -> ModelConfig:
  """A Gemma 3 text decoder: every 6th layer global, local RoPE base 10,000, tied, GeGLU."""
  return ModelConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6,
      rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=max_positions,
      architecture="gemma3", hidden_activation="gelu_pytorch_tanh", sliding_window=window,
      sliding_window_pattern=6, rope_local_theta=10_000.0, rope_linear_factor=rope_factor,
      query_pre_attn_scalar=query_pre_attn_scalar)


PRESETS = {
    "smollm2": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192),
    "llama3_8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072),
    "llama3_70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072),
    "qwen2_5_7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=True, max_position_embeddings=32768, architecture="qwen2"),
    # Gemma 3 (text decoders; the 4B-27B checkpoints are multimodal, their vision tower is not
    # counted): shapes from the models' config.json files.
    "gemma3_270m": _gemma3(262144, 640, 2048, 18, 4, 1, 256, window=512, max_positions=32768),
    "gemma3_1b": _gemma3(262144, 1152, 6912, 26, 4, 1, 256, window=512, max_positions=32768),
    "gemma3_4b": _gemma3(262208, 2560, 10240, 34, 8, 4, 256, rope_factor=8.0),
    "gemma3_12b": _gemma3(262208, 3840, 15360, 48, 16, 8, 256, rope_factor=8.0),
    "gemma3_27b": _gemma3(262208, 5376, 21504, 62, 32, 16, 128, rope_factor=8.0,
                          query_pre_attn_scalar=168.0),
}

# Published dense peaks (TFLOP/s) and memory (GiB) per device, for kinds JAX reports.
DEVICES = {
    "H200": (989.0, 141.0, "bfloat16"), "H100": (989.0, 80.0, "bfloat16"),
    "A100": (312.0, 80.0, "bfloat16"), "TPU v4": (275.0, 32.0, "bfloat16"),
    "TPU v5 lite": (197.0, 16.0, "bfloat16"), "TPU v5p": (459.0, 95.0, "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class Throughput:
  """How fast a kind of device runs the scoring programs, and how that is known."""

  efficiency: float  # steady executed FLOP/s over the device's dense peak
  compile_s: float  # seconds per compiled scoring program
  label: str  # "measured" or "assumed"
  source: str  # where the numbers come from, in a phrase


# Compile seconds are planned cold (an empty compilation cache); a rerun of the same shapes
# loads its programs from the launchers' persistent cache instead.
CPU_THROUGHPUT = Throughput(
    efficiency=0.64, compile_s=2.5, label="measured",
    source="SmolLM2 float32 on the 2-core dev CPU: the sweeps ran at 64-75% of the 2048^3 "
    "matmul peak at HEAD on a freshly booted box on 2026-12-04 (64% the lower run, both "
    "protocols; 45-77% over a week as this shared box's speed drifted; "
    "benchmarks/RESULTS_pas.md); 2.5 s per scoring program traced and compiled cold "
    "(benchmarks/RESULTS_compile_cache.md)")
# No accelerator has run the scoring programs yet (benchmarks/RESULTS_device.md): until a
# device check does (`measured_throughput`), they are planned at these stated guesses.
ACCELERATOR_THROUGHPUT = Throughput(
    efficiency=0.40, compile_s=10.0, label="assumed",
    source="a guess, not a measurement: 40% of the published bf16 peak, which tuned dense "
    "transformer stacks reach or pass on Hopper GPUs and TPUs (these XLA programs have no "
    "hand-tuned kernels); 10 s per compiled program, 4x the CPU's measured 2.5 s, for XLA's "
    "GPU compile with GEMM autotuning (the layers are scanned, so a program compiles one "
    "layer whatever the depth)")


def throughput_for(kind: str) -> Throughput:
  """The table's throughput for a device kind ("cpu", or an accelerator: assumed)."""
  return CPU_THROUGHPUT if "cpu" in kind.lower() else ACCELERATOR_THROUGHPUT


# The device check's stages that run scoring programs (benchmarks/device_check.py).
DEVICE_CHECK_STAGES = ("activations", "pas_paper", "pas_honest")


def measured_throughput(report: dict) -> tuple[str, Throughput]:
  """(device kind, throughput) measured by a device check (its `device_check.json`).

  The efficiency pools the completed stages' executed FLOPs over their steady seconds (wall
  less compile) and the devices' peak; compile seconds are the PAS stages' compile time over
  the programs they compiled (probe fits' small programs included, so per program it errs
  high). Raises ValueError when no stage that runs scoring programs completed.
  """
  setup = report.get("stages", {}).get("setup", {})
  done = [report["stages"][name] for name in DEVICE_CHECK_STAGES
          if report.get("stages", {}).get(name, {}).get("status") == "ok"]
  if setup.get("status") != "ok" or not done:
    raise ValueError("the device check has no completed setup and scoring stage "
                     f"({', '.join(DEVICE_CHECK_STAGES)})")
  peak = float(setup["peak_flops_per_device"]) * int(setup["devices"])
  steady = sum(max(stage["wall_s"] - stage["compile_s"], 1e-9) for stage in done)
  efficiency = sum(float(stage["flops"]) for stage in done) / steady / peak
  programs = sum(int(stage.get("programs_compiled", 0)) for stage in done)
  compile_s = sum(stage["compile_s"] for stage in done if "programs_compiled" in stage)
  stages = ", ".join(stage["stage"] for stage in done)
  source = (f"device check of {report.get('started', '?')} (preset {report.get('preset')}, "
            f"{report.get('dtype')}; stages {stages})")
  return setup["device_kind"], Throughput(
      efficiency=efficiency, compile_s=compile_s / programs if programs else
      ACCELERATOR_THROUGHPUT.compile_s, label="measured", source=source)


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
  """The best FLOP/s of an n^3 `jnp.dot` on the default device: the peak that utilisation is
  measured against on machines without a published one (CPUs)."""
  import time

  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype)
  dot = jax.jit(lambda x: x @ x)
  dot(a).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def layer_flops(c: ModelConfig, tokens: int, keys: int) -> float:
  """FLOPs of all decoder layers for `tokens` queries each attending to `keys` slots."""
  linear = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  linear += 2 * c.num_heads * c.head_dim * c.hidden_size + 6 * c.hidden_size * c.intermediate_size
  return c.num_layers * tokens * (linear + 4 * c.num_heads * c.head_dim * keys)


def encode_flops(c: ModelConfig, bucket: int) -> float:
  """One context encode (`scoring.encode_prefixes`), in two halves above the split length."""
  if bucket < scoring.PREFILL_SPLIT_MIN or bucket % 2:
    return layer_flops(c, bucket, bucket)
  half = bucket // 2
  return layer_flops(c, half, half) + layer_flops(c, half, bucket)


def useful_score_flops(c: ModelConfig, context_lengths: Sequence[int],
                       question_lengths: Sequence[int]) -> float:
  """FLOPs a `scoring.score_contexts` call needs at least: every context encoded once over its
  own tokens under the causal mask, every question over its context and its own earlier
  tokens, and the vocabulary head at each question's last token; no padding, no masked keys.
  Compare `score_cost` (what the compiled programs execute)."""
  contexts = np.asarray(context_lengths, np.float64)
  questions = np.asarray(question_lengths, np.float64)
  linear = layer_flops(c, 1, 0)  # per token, no attention
  encode = contexts.sum() * linear + _attention_flops(c, 0, contexts).sum()
  ask = len(contexts) * questions.sum() * linear + _attention_flops(
      c, contexts[:, None], contexts[:, None] + questions[None, :]).sum()
  head = len(contexts) * len(questions) * 2 * c.hidden_size * c.vocab_size
  return float(encode + ask + head)


def _visible_keys(first: np.ndarray, last: np.ndarray, window: float) -> np.ndarray:
  """Keys seen by the queries at positions first..last-1, causal, at most `window` each."""
  def triangle(a, b):  # sum of i for i in (a, b]
    return np.where(b > a, (b - a) * (a + b + 1) / 2, 0.0)
  if np.isinf(window):
    return triangle(first, last)
  capped_end = np.minimum(last, window)
  return triangle(first, capped_end) + window * np.maximum(last - np.maximum(first, window), 0)


def _attention_flops(c: ModelConfig, first, last) -> np.ndarray:
  """Score and value FLOPs of the queries at positions first..last-1 (arrays broadcast) over
  the keys they may see: every earlier one on global layers, the last `sliding_window` on
  Gemma's local ones."""
  first, last = np.asarray(first, np.float64), np.asarray(last, np.float64)
  per_pair = 4 * c.num_heads * c.head_dim  # one layer, one (query, key) pair
  local = sum(c.sliding_layers())
  flops = (c.num_layers - local) * per_pair * _visible_keys(first, last, np.inf)
  if local:
    flops = flops + local * per_pair * _visible_keys(first, last, c.sliding_window)
  return flops


def useful_capture_flops(c: ModelConfig, lengths: Sequence[int]) -> float:
  """`useful_score_flops` for `scoring.capture_head_outputs`: each prompt once, causal."""
  lengths = np.asarray(lengths, np.float64)
  return float(lengths.sum() * layer_flops(c, 1, 0) + _attention_flops(c, 0, lengths).sum())


def score_cost(c: ModelConfig, context_lengths: Sequence[int], question_lengths: Sequence[int],
               prefix_batch: int, question_batch: int) -> tuple[int, float]:
  """(real tokens, executed FLOPs) of one `scoring.score_contexts` call."""
  q_sorted = sorted(question_lengths)
  q_buckets = [scoring.bucket_length(max(q_sorted[i:i + question_batch]))
               for i in range(0, len(q_sorted), question_batch)]
  flops = 0.0
  for chosen, bucket in scoring.plan_prefix_batches(context_lengths, prefix_batch):
    rows = len(chosen)
    flops += rows * encode_flops(c, bucket)
    for t in q_buckets:  # question rows, then the full-vocabulary head at the last token
      flops += rows * (layer_flops(c, question_batch * t, bucket + t)
                       + 2 * c.hidden_size * c.vocab_size * question_batch)
  tokens = sum(context_lengths) + len(context_lengths) * sum(question_lengths)
  return tokens, flops


def capture_cost(c: ModelConfig, lengths: Sequence[int], batch: int = 16) -> tuple[int, float]:
  """`scoring.capture_head_outputs` (length-sorted batches, each padded to its bucket)."""
  lengths = sorted(lengths)
  buckets = [scoring.bucket_length(max(lengths[i:i + batch]))
             for i in range(0, len(lengths), batch)]
  return sum(lengths), sum(layer_flops(c, batch * b, b) for b in buckets)


@dataclasses.dataclass(frozen=True)
class PromptLengths:
  """Token lengths of the PAPI prompts (contexts include the shared question head)."""

  few_shot: np.ndarray  # int[subjects]: few-shot contexts from all 120 known answers
  fold: np.ndarray  # int[folds, subjects]: contexts without each fold's answers
  heldout: np.ndarray  # int[180]: question turns of the held-out items
  known: np.ndarray  # int[120]: question turns of the known items
  content_free: np.ndarray  # int[3]
  activations: np.ndarray  # int[240]: the shared activation prompts
  description: np.ndarray  # int[subjects]: P² contexts (the subjects' PAPI descriptions)
  zero_shot: int  # the default system prompt's context

  @classmethod
  def measure(cls, engine, known_answers: np.ndarray, folds: int, seed: int,
              descriptions: Sequence[str] = ()) -> PromptLengths:
    """Lengths with `engine`'s tokenizer for subjects with these `[subjects, 120]` answers and
    (for P²) these descriptions; without any, P² cannot be planned."""
    from palign_jax import data, prompts
    from palign_jax.protocol import alignment

    split, items = data.load_split(), data.load_items()
    length = lambda system: len(engine.context_tokens(system))
    few_shot = lambda answers: length(prompts.few_shot_system_prompt(answers))
    fold_of = alignment.fold_of_known_items(folds, seed)
    tokenizer = engine.model.tokenizer
    return cls(
        few_shot=np.array([few_shot(a) for a in known_answers]),
        fold=np.array([[few_shot(np.where(fold_of == f, 0, a)) for a in known_answers]
                       for f in range(folds)]),
        heldout=np.array([len(q) for q in engine.question_tokens(split.heldout)]),
        known=np.array([len(q) for q in engine.question_tokens(split.known)]),
        content_free=np.array([len(q) for q in engine._content_free]),
        activations=np.array([len(prompts.encode_activation_prompt(tokenizer, items.text[j], x))
                              for j in split.known for x in ("A", "E")]),
        description=np.array([length(prompts.description_system_prompt(d))
                              for d in descriptions], np.int64),
        zero_shot=length(prompts.DEFAULT_SYSTEM_PROMPT))


Call = tuple[list[int], list[int]]  # (context length of each (context, alpha) row, questions)


def protocol_calls(lengths: PromptLengths, *, subjects: int, subjects_per_batch: int,
                   alphas: int, folds: int, oracle: bool, honest: bool,
                   test_alphas_per_subject: int = 2, zero_shot: bool = False,
                   personality_prompt: bool = False) -> list[Call]:
  """The scoring calls of a run, as `launch.evaluate` makes them (`methods.llm_records`).

  zero_shot: one context for everybody, asked the held-out and the known items once per run.
  personality_prompt: P², each batch's subjects' descriptions asked the held-out items.
  honest: per batch, each fold's contexts at every alpha asked that fold's known items; then
  the test sweep, planned with `test_alphas_per_subject` alphas (alpha 0 and the chosen one;
  more when the readouts choose differently), or every alpha with `oracle`.
  Every call also asks the content-free questions (the letter prior).
  """
  from palign_jax.protocol import alignment

  if personality_prompt and not len(lengths.description):
    raise ValueError("protocol_calls: P² needs the descriptions' lengths (PromptLengths)")
  fold_of = alignment.fold_of_known_items(folds, 0)
  cf = list(lengths.content_free)
  calls = []
  if zero_shot:
    calls.append(([lengths.zero_shot], list(lengths.heldout) + list(lengths.known) + cf))
  reps = lambda values, k: list(np.repeat(np.resize(values, subjects)[rows], k))
  for start in range(0, subjects, subjects_per_batch):
    rows = slice(start, min(start + subjects_per_batch, subjects))
    if personality_prompt:
      calls.append((reps(lengths.description, 1), list(lengths.heldout) + cf))
    if honest or oracle:
      if honest:
        for f in range(folds):
          calls.append((reps(lengths.fold[f], alphas), list(lengths.known[fold_of == f]) + cf))
      per_subject = alphas if oracle else test_alphas_per_subject
      calls.append((reps(lengths.few_shot, per_subject), list(lengths.heldout) + cf))
  return calls


def alpha_range_call(lengths: PromptLengths, *, reference_subjects: int, probe_alphas: int,
                     items: int) -> Call:
  """The "model_range" grid's one measurement (`alpha_range.measure`): the reference
  subjects' few-shot contexts at alpha 0 and each probe alpha, asked `items` known items
  (planned at the first known items' lengths; the measured subset differs by a few tokens)."""
  contexts = np.repeat(np.resize(lengths.few_shot, reference_subjects), probe_alphas + 1)
  return list(contexts), list(lengths.known[:items])


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run will cost."""

  flops: float  # executed FLOPs of every scoring call and the activations
  useful_flops: float  # what those calls need at least (`useful_score_flops`)
  tokens: int  # real (unpadded) tokens
  programs: int  # distinct scoring programs compiled
  devices: int
  compute_seconds: float  # executed FLOPs at the throughput's efficiency
  compile_seconds: float  # programs x the throughput's compile seconds
  seconds: float  # estimated wall time: compute + compile
  throughput: Throughput
  memory: dict  # bytes per device: params, kv_cache, activations, total, available

  def mfu(self, peak_flops: float) -> float:
    """Model FLOP utilisation this time implies: useful FLOPs over (devices x peak x time)."""
    return self.useful_flops / (self.devices * peak_flops * self.seconds)


class _MeshShape:
  """A stand-in mesh with only axis sizes, enough to plan shardings without devices."""

  def __init__(self, data: int, model: int):
    self.shape = {"data": data, "model": model}


def param_bytes_per_device(config: ModelConfig, dtype_bytes: int, data: int, model: int,
                           fsdp: bool) -> float:
  """Bytes of the parameters one device holds under `parallel.rules`."""
  c, mesh, rules = config, _MeshShape(data, model), parallel.rules(fsdp)
  shapes = params_lib.param_shapes(c)
  total = 0.0
  for key, shape in shapes.items():
    spec, _ = parallel._spec(shape, parallel.PARAM_AXES[key], mesh, rules)
    shards = np.prod([mesh.shape[a] for a in spec if a is not None] or [1])
    total += np.prod(shape) * dtype_bytes / shards
  return total


ATTENTION = ("einsum", "cudnn")


def attention_for(kind: str, dtype: str) -> str:
  """The attention the model runs on a device kind: cuDNN's fused (flash) kernel on an NVIDIA
  GPU in 16-bit floats, else the einsum that materialises the float32 scores."""
  gpu = any(k.lower() in kind.lower() for k in ("H200", "H100", "A100", "GPU", "NVIDIA"))
  return "cudnn" if gpu and dtype in ("bfloat16", "float16") else "einsum"


def memory_per_device(config: ModelConfig, *, dtype_bytes: int, data: int, model: int,
                      fsdp: bool, prefix_batch: int, context_length: int, question_batch: int,
                      question_length: int, attention: str = "einsum") -> dict:
  """Bytes per device: parameters, the key/value caches of a prefix batch (split over data,
  and over model where it divides the kv heads), and the largest per-layer temporaries.

  attention: "einsum" materialises a layer's float32 scores `[batch, heads, T, S]`; "cudnn"
  (flash attention) keeps them in on-chip tiles, so they are not counted.
  """
  if attention not in ATTENTION:
    raise ValueError(f"memory_per_device: attention {attention!r} is not one of {ATTENTION}")
  c = config
  pairs = max(1, prefix_batch // data)
  kv_split = model if c.num_kv_heads % model == 0 else 1
  head_split = model if c.num_heads % model == 0 else 1
  cache = pairs * 2 * c.num_layers * context_length * c.num_kv_heads * c.head_dim * dtype_bytes
  rows = question_batch * question_length
  scores = 0.0 if attention == "cudnn" else 4 * c.num_heads / head_split * max(
      context_length * context_length, rows * (context_length + question_length))
  mlp_split = model if c.intermediate_size % model == 0 else 1
  mlp = rows * (2 * c.intermediate_size / mlp_split + 4 * c.hidden_size) * max(dtype_bytes, 4)
  params = param_bytes_per_device(c, dtype_bytes, data, model, fsdp)
  activations = pairs * (scores + mlp)
  return {"params": params, "kv_cache": cache / kv_split, "activations": activations,
          "total": params + cache / kv_split + activations}


def estimate(config: ModelConfig, calls, *, activation_lengths: Sequence[int],
             prefix_batch: int, question_batch: int, devices: int, peak_flops: float,
             throughput: Throughput = CPU_THROUGHPUT) -> Plan:
  """FLOPs (executed and useful), tokens, compiled programs and wall time of a run's scoring
  calls and its activation capture, at `throughput` (`throughput_for` the device kind)."""
  tokens, flops = capture_cost(config, activation_lengths)
  useful = useful_capture_flops(config, activation_lengths)
  shapes = set()
  for contexts, questions in calls:
    t, f = score_cost(config, contexts, questions, prefix_batch, question_batch)
    tokens, flops = tokens + t, flops + f
    useful += useful_score_flops(config, contexts, questions)
    shapes |= scoring.program_shapes(contexts, questions, prefix_batch, question_batch)
  compute = flops / (devices * peak_flops * throughput.efficiency)
  compile_seconds = len(shapes) * throughput.compile_s
  return Plan(flops=flops, useful_flops=useful, tokens=tokens, programs=len(shapes),
              devices=devices, compute_seconds=compute, compile_seconds=compile_seconds,
              seconds=compute + compile_seconds, throughput=throughput, memory={})


def tensor_parallel_traffic(config: ModelConfig, model: int, devices_per_host: int,
                            rows: int, dtype_bytes: int) -> dict:
  """The collectives of one decoder layer under tensor parallelism over `model` devices:
  two all-reduces of the `[rows, hidden]` activations (after `o_proj` and after `down_proj`;
  counted in the compiled HLO by tests/test_sharding.py), and whether they cross hosts (a
  `model` axis larger than a host's devices, possible in pod mode only)."""
  if model == 1:
    return {"all_reduces": 0, "bytes_each": 0, "cross_host": False}
  return {"all_reduces": 2, "bytes_each": rows * config.hidden_size * dtype_bytes,
          "cross_host": model > devices_per_host}


def needs_pod(config: ModelConfig, dtype_bytes: int, devices_per_host: int,
              device_memory: float) -> bool:
  """Whether the parameters alone exceed 80% of one host's devices, split over all of them
  (tensor parallel and FSDP): then no single process can hold the model, and only pod mode
  (one mesh over several hosts) can run it."""
  total = sum(float(np.prod(shape)) for shape in params_lib.param_shapes(config).values())
  return total * dtype_bytes > 0.8 * devices_per_host * device_memory
