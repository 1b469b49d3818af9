"""The cost model: FLOPs, memory per device and time of a PAS run, from shapes alone.

Owns what a run costs before it runs: the FLOPs the scoring programs execute (`layer_flops`,
`score_cost`), the PAPI protocol's plan of scoring calls (`protocol_calls`), memory per device
on a mesh (`memory_per_device`) and a time estimate (`estimate`). It needs a `ModelConfig`
(presets `PRESETS`, or a GGUF / Hugging Face config read without its weights) and the token
lengths of the prompts, measured with the embedded SmolLM2 tokenizer (other tokenizers give
lengths within a few tens of percent; the estimate says it is an estimate).

FLOPs are those the programs execute: matmuls (2 m n k) and attention over every key slot,
padding and the masked half of a causal block included; elementwise work is not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from palign_jax import parallel, scoring
from palign_jax.models import params as params_lib
from palign_jax.models.config import ModelConfig, RopeScaling

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
}

# Published dense peaks (TFLOP/s) and memory (GiB) per device, for kinds JAX reports.
DEVICES = {
    "H200": (989.0, 141.0, "bfloat16"), "H100": (989.0, 80.0, "bfloat16"),
    "A100": (312.0, 80.0, "bfloat16"), "TPU v4": (275.0, 32.0, "bfloat16"),
    "TPU v5 lite": (197.0, 16.0, "bfloat16"), "TPU v5p": (459.0, 95.0, "bfloat16"),
}
# Steady FLOP/s of the scoring programs over the matmul peak measured in the same run
# (benchmarks/RESULTS_pas.md: 70-74% on the 2-core CPU). Accelerators are planned at the same
# share of their published peak until a run there measures theirs.
EFFICIENCY = 0.7
COMPILE_S = 5.0  # seconds per compiled scoring program (CPU, SmolLM2; larger models take more)


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

  @classmethod
  def measure(cls, engine, known_answers: np.ndarray, folds: int, seed: int) -> PromptLengths:
    """Lengths with `engine`'s tokenizer for subjects with these `[subjects, 120]` answers."""
    from palign_jax import data, prompts
    from palign_jax.protocol import alignment

    split, items = data.load_split(), data.load_items()
    length = lambda answers: len(engine.context_tokens(prompts.few_shot_system_prompt(answers)))
    fold_of = alignment.fold_of_known_items(folds, seed)
    tokenizer = engine.model.tokenizer
    return cls(
        few_shot=np.array([length(a) for a in known_answers]),
        fold=np.array([[length(np.where(fold_of == f, 0, a)) for a in known_answers]
                       for f in range(folds)]),
        heldout=np.array([len(q) for q in engine.question_tokens(split.heldout)]),
        known=np.array([len(q) for q in engine.question_tokens(split.known)]),
        content_free=np.array([len(q) for q in engine._content_free]),
        activations=np.array([len(prompts.encode_activation_prompt(tokenizer, items.text[j], x))
                              for j in split.known for x in ("A", "E")]))


def protocol_calls(lengths: PromptLengths, *, subjects: int, subjects_per_batch: int,
                   alphas: int, folds: int, oracle: bool, honest: bool,
                   test_alphas_per_subject: int = 2) -> list[tuple[list[int], list[int]]]:
  """The scoring calls of a run: (context length of each (subject, alpha) pair, question
  lengths). The honest test sweep is planned with `test_alphas_per_subject` alphas (alpha 0 and
  the chosen one; more when the readouts choose differently)."""
  from palign_jax.protocol import alignment

  fold_of = alignment.fold_of_known_items(folds, 0)
  cf = list(lengths.content_free)
  calls = []
  reps = lambda values, k: list(np.repeat(np.resize(values, subjects)[rows], k))
  for start in range(0, subjects, subjects_per_batch):
    rows = slice(start, min(start + subjects_per_batch, subjects))
    if honest:
      for f in range(folds):
        calls.append((reps(lengths.fold[f], alphas), list(lengths.known[fold_of == f]) + cf))
    per_subject = alphas if oracle else test_alphas_per_subject
    calls.append((reps(lengths.few_shot, per_subject), list(lengths.heldout) + cf))
  return calls


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run will cost."""

  flops: float  # executed FLOPs of every scoring call and the activations
  tokens: int  # real (unpadded) tokens
  programs: int  # distinct scoring programs compiled
  devices: int
  seconds: float  # estimated wall time
  memory: dict  # bytes per device: params, kv_cache, activations, total, available


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


def memory_per_device(config: ModelConfig, *, dtype_bytes: int, data: int, model: int,
                      fsdp: bool, prefix_batch: int, context_length: int, question_batch: int,
                      question_length: int) -> dict:
  """Bytes per device: parameters, the key/value caches of a prefix batch (split over data,
  and over model where it divides the kv heads), and the largest per-layer temporaries."""
  c = config
  pairs = max(1, prefix_batch // data)
  kv_split = model if c.num_kv_heads % model == 0 else 1
  head_split = model if c.num_heads % model == 0 else 1
  cache = pairs * 2 * c.num_layers * context_length * c.num_kv_heads * c.head_dim * dtype_bytes
  rows = question_batch * question_length
  scores = 4 * c.num_heads / head_split * max(context_length * context_length,
                                              rows * (context_length + question_length))
  mlp_split = model if c.intermediate_size % model == 0 else 1
  mlp = rows * (2 * c.intermediate_size / mlp_split + 4 * c.hidden_size) * max(dtype_bytes, 4)
  params = param_bytes_per_device(c, dtype_bytes, data, model, fsdp)
  activations = pairs * (scores + mlp)
  return {"params": params, "kv_cache": cache / kv_split, "activations": activations,
          "total": params + cache / kv_split + activations}


def estimate(config: ModelConfig, calls, *, activation_lengths: Sequence[int],
             prefix_batch: int, question_batch: int, devices: int, peak_flops: float,
             efficiency: float = EFFICIENCY, compile_s: float = COMPILE_S) -> Plan:
  """FLOPs, tokens, compiled programs and wall time of a run's scoring calls."""
  tokens, flops = capture_cost(config, activation_lengths)
  shapes = set()
  for contexts, questions in calls:
    t, f = score_cost(config, contexts, questions, prefix_batch, question_batch)
    tokens, flops = tokens + t, flops + f
    shapes |= scoring.program_shapes(contexts, questions, prefix_batch, question_batch)
  seconds = flops / (devices * peak_flops * efficiency) + len(shapes) * compile_s
  return Plan(flops=flops, tokens=tokens, programs=len(shapes), devices=devices,
              seconds=seconds, memory={})
