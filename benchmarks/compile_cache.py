"""The persistent compilation cache's effect: one launcher command run twice on a fresh cache.

Owns the measurement behind benchmarks/RESULTS_compile_cache.md. Each run is a child process
(this file with `--child`) that records JAX's compile events while running the launcher as
`python -m LAUNCHER ARGS`: seconds in XLA's backend compile (on a cache hit, the time to read
the program back), seconds tracing and lowering (never cached), and the cache's hits and misses.
Both runs use the same fresh `--config.compile_cache.dir` under OUT and their own output
folder, so the second run redoes the same work (launchers resume from their output folder).

  python benchmarks/compile_cache.py --out=/tmp/cc launch.evaluate \\
      --config=configs/quickstart.py --methods=zero_shot,personality_prompt --subjects=0:1
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import pathlib
import runpy
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def child(record_path: str, launcher: str, args: list[str]) -> None:
  """Runs `python -m launcher args` in this process, writing its compile events at exit."""
  import jax

  seconds, counts = collections.Counter(), collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: seconds.update({event: duration}))
  jax.monitoring.register_event_listener(lambda event, **_: counts.update({event: 1}))
  start = time.perf_counter()

  def write() -> None:
    record = {"wall_s": time.perf_counter() - start, "seconds": dict(seconds),
              "counts": dict(counts)}
    pathlib.Path(record_path).write_text(json.dumps(record, indent=1))

  atexit.register(write)
  sys.argv = [launcher, *args]
  sys.path.insert(0, str(ROOT))
  runpy.run_module(launcher, run_name="__main__", alter_sys=True)


def summary(record: dict, cache: pathlib.Path) -> dict:
  """One table row: compile seconds, trace + lowering seconds, hits, misses, cache size."""
  seconds, counts = record["seconds"], record["counts"]
  files = [f for f in cache.rglob("*") if f.is_file()] if cache.exists() else []
  return {
      "wall_s": record["wall_s"], "backend_compile_s": seconds.get(BACKEND_COMPILE, 0.0),
      "trace_and_lower_s": sum(v for k, v in seconds.items()
                               if k.startswith("/jax/core/compile/") and k != BACKEND_COMPILE),
      "compile_s_saved": seconds.get("/jax/compilation_cache/compile_time_saved_sec", 0.0),
      "cache_hits": counts.get("/jax/compilation_cache/cache_hits", 0),
      "cache_misses": counts.get("/jax/compilation_cache/cache_misses", 0),
      "cache_files": len(files), "cache_mb": sum(f.stat().st_size for f in files) / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="a new folder: the cache, outputs, records")
  parser.add_argument("--runs", type=int, default=2, help="runs of the same command")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("launcher", help="the launcher module, e.g. launch.evaluate")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the launcher's arguments")
  options = parser.parse_args()
  if options.child:
    child(options.child, options.launcher, options.args)
    return
  out = pathlib.Path(options.out)
  out.mkdir(parents=True, exist_ok=False)  # a fresh cache, or the first run is not a miss
  cache = out / "xla"
  rows = []
  for run in range(1, options.runs + 1):
    record_path = out / f"run{run}.json"
    command = [sys.executable, __file__, f"--out={out}", f"--child={record_path}",
               options.launcher, *options.args, f"--config.compile_cache.dir={cache}",
               f"--output_dir={out / f'output{run}'}"]
    load = os.getloadavg()[0]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    row = {"run": run, "load1_before": load,
           **summary(json.loads(record_path.read_text()), cache)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
