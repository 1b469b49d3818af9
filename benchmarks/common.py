"""What the benchmarks share: compile-time accounting, memory readings, and a scoring logger
that counts the FLOPs of every call (with `palign_jax.planner`'s cost model)."""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from palign_jax import planner  # noqa: E402

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
