"""What the benchmarks share: compile-time accounting, memory readings, and a scoring logger
that counts the FLOPs of every call (with `palign_jax.planner`'s cost model); model presets
with random weights and the shipped tokenizer, device peaks, and the useful FLOPs (unpadded,
causal) beside the executed ones (`CostLog`)."""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from palign_jax import planner  # noqa: E402
from palign_jax.models.config import ModelConfig  # noqa: E402
from palign_jax.models.llama import Llama  # noqa: E402

_COMPILE_SPANS: list[tuple[float, float]] = []


def _on_duration(event: str, duration: float, **_) -> None:
  if event.startswith("/jax/core/compile/"):
    end = time.perf_counter()
    _COMPILE_SPANS.append((end - duration, end))


def track_compiles() -> None:
  """Starts recording JAX's compile events (trace, lowering, XLA compile)."""
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


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


class ScoreLog:
  """Wraps `engine.score` to log every call: times, compile time, tokens and FLOPs."""

  def __init__(self, engine):
    self.engine, self.calls = engine, []
    self._score = engine.score
    engine.score = self

  def __call__(self, contexts, items, *, steering=None, pairs=None, **kwargs):
    start = time.perf_counter()
    out = self._score(contexts, items, steering=steering, pairs=pairs, **kwargs)
    end = time.perf_counter()
    if pairs is None:
      n_alphas = 1 if steering is None else steering.shape[1]
      pairs = np.array([(c, a) for c in range(len(contexts)) for a in range(n_alphas)])
    lengths = [len(contexts[c]) for c, _ in pairs]
    questions = [len(q) for q in self.engine.question_tokens(items)]
    if kwargs.get("content_free"):
      questions += [len(q) for q in self.engine._content_free]
    tokens, flops = planner.score_cost(self.engine.config, lengths, questions,
                                       self.engine.prefix_batch(max(lengths)),
                                       self.engine.question_batch)
    self.calls.append({"start": start, "end": end, "compile_s": compile_seconds(start, end),
                       "tokens": tokens, "flops": flops, "pairs": len(pairs),
                       "items": len(items)})
    return out

  def totals(self, start: float, end: float) -> dict:
    calls = [c for c in self.calls if c["start"] >= start and c["end"] <= end]
    return {k: sum(c[k] for c in calls) for k in ("tokens", "flops", "pairs")}


def stage(name: str, start: float, end: float, *, tokens: float = 0, flops: float = 0,
          subjects: int = 1, note: str = "") -> dict:
  """One row of a benchmark table (compile time read from JAX's events)."""
  return {"stage": name, "wall_s": end - start, "compile_s": compile_seconds(start, end),
          "tokens": tokens, "flops": flops, "subjects": subjects, "rss_mb": peak_rss_mb(),
          "device_mb": device_peak_mb(), "load1": os.getloadavg()[0], "note": note}


def steady(s: dict) -> float:
  return max(s["wall_s"] - s["compile_s"], 1e-9)


# --- Shared by bench_accelerator.py and device_check.py: model shapes, random weights, peaks,
# and the useful (unpadded, causal) FLOPs beside the executed ones. ---

TINY = ModelConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
PRESETS = dict(planner.PRESETS, tiny=TINY)


def device_peak(peak_tflops: float | None = None, matmul_n: int = 2048) -> tuple[str, float]:
  """(device kind, dense peak FLOP/s per device): `peak_tflops` if given, else the published
  bf16 peak of a kind in `planner.DEVICES`, else (CPUs) a float32 matmul measured now."""
  kind = jax.devices()[0].device_kind
  if peak_tflops:
    return kind, peak_tflops * 1e12
  for name, (tflops, _, _) in planner.DEVICES.items():
    if name.lower() in kind.lower():
      return kind, tflops * 1e12
  return kind, planner.matmul_peak(n=matmul_n)


def param_shapes(config: ModelConfig, dtype: str):
  """The parameter tree of `Llama(config, dtype)` as `jax.ShapeDtypeStruct`s."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Llama(config, jnp.dtype(dtype)).init(
      jax.random.PRNGKey(0), tokens, jnp.broadcast_to(jnp.arange(4), (1, 4)))["params"])


def random_params(config: ModelConfig, dtype: str, shardings=None, seed: int = 0):
  """Random parameters scaled like an initialised model (normal, std 0.02; norm scales 1),
  drawn by one compiled program straight into `shardings` (a tree like the params; None: the
  default device). The keys are XLA's RngBitGenerator ("rbg"), which compiles in a third of
  threefry's time on a CPU; its bits may differ between backends and shardings, so compare
  devices by copying one draw (as `benchmarks/device_check.py` does), not by redrawing."""
  shapes = param_shapes(config, dtype)
  leaves, treedef = jax.tree.flatten(shapes)

  def draw(seed):
    key = jax.random.key(seed, impl="rbg")
    out = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
            ).astype(leaf.dtype) for i, leaf in enumerate(leaves)]
    # Norm scales at one, so activations keep a sensible size through the layers.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if path[-1].key == "scale" else x,
        jax.tree.unflatten(treedef, out))

  return jax.jit(draw, out_shardings=shardings)(seed)


def random_model(config: ModelConfig, dtype: str, mesh=None, seed: int = 0):
  """A `loading.LoadedModel` with `random_params` (placed by `parallel.param_shardings` on
  `mesh`, or on the default device) and the shipped SmolLM2 tokenizer (no GGUF needed; its
  ids are valid Llama-3 ids; real Llama-3 prompts are ~10% shorter)."""
  from palign_jax import parallel
  from palign_jax.models import loading
  from palign_jax.models.shipped_tokenizer import load_shipped_tokenizer

  shardings = None if mesh is None else parallel.param_shardings(param_shapes(config, dtype),
                                                                 mesh)
  return loading.LoadedModel(
      config=config, params=random_params(config, dtype, shardings, seed),
      tokenizer=load_shipped_tokenizer(),
      fingerprint=f"random-{config.num_layers}x{config.hidden_size}-{dtype}-{seed}",
      source="random weights")


def useful_score_flops(c: ModelConfig, context_lengths, question_lengths) -> float:
  """FLOPs a `scoring.score_contexts` call needs at least: every context encoded once over its
  own tokens under the causal mask, every question over its context and its own earlier tokens,
  and the vocabulary head at each question's last token; no padding, no masked keys. Compare
  `planner.score_cost` (what the compiled programs execute).

  context_lengths: int[pairs] (one per (context, alpha) row); question_lengths: int[questions].
  """
  contexts = np.asarray(context_lengths, np.float64)
  questions = np.asarray(question_lengths, np.float64)
  linear = planner.layer_flops(c, 1, 0)  # per token, no attention
  attend = planner.layer_flops(c, 1, 1) - linear  # per (query, key) pair
  encode = contexts.sum() * linear + attend * (contexts * (contexts + 1) / 2).sum()
  pairs_keys = (questions[None, :] * (contexts[:, None] + (questions[None, :] + 1) / 2)).sum()
  ask = len(contexts) * questions.sum() * linear + attend * pairs_keys
  head = len(contexts) * len(questions) * 2 * c.hidden_size * c.vocab_size
  return float(encode + ask + head)


def useful_capture_flops(c: ModelConfig, lengths) -> float:
  """`useful_score_flops` for `scoring.capture_head_outputs`: each prompt once, causal, unpadded
  (lengths: int[prompts]; compare `planner.capture_cost`)."""
  lengths = np.asarray(lengths, np.float64)
  linear = planner.layer_flops(c, 1, 0)
  attend = planner.layer_flops(c, 1, 1) - linear
  return float(lengths.sum() * linear + attend * (lengths * (lengths + 1) / 2).sum())


class CostLog(ScoreLog):
  """`ScoreLog` that also records each call's useful FLOPs (`useful_score_flops`)."""

  def __call__(self, contexts, items, *, steering=None, pairs=None, **kwargs):
    out = super().__call__(contexts, items, steering=steering, pairs=pairs, **kwargs)
    if pairs is None:
      alphas = 1 if steering is None else steering.shape[1]
      rows = [c for c in range(len(contexts)) for _ in range(alphas)]
    else:
      rows = [c for c, _ in np.asarray(pairs)]
    questions = [len(q) for q in self.engine.question_tokens(items)]
    if kwargs.get("content_free"):
      questions += [len(q) for q in self.engine._content_free]
    self.calls[-1]["useful_flops"] = useful_score_flops(
        self.engine.config, [len(contexts[c]) for c in rows], questions)
    return out

  def totals(self, start: float, end: float) -> dict:
    calls = [c for c in self.calls if c["start"] >= start and c["end"] <= end]
    return {k: sum(c[k] for c in calls) for k in ("tokens", "flops", "useful_flops", "pairs")}
