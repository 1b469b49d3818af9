"""Model load time: converting a checkpoint vs restoring the orbax params cache.

Each row runs `load_model` in a fresh Python process (so imports, page cache of the Python
code and JAX start-up are alike) and reports the wall time of the `load_model` call alone,
parameters per second, and the process's peak RSS. Baseline: `use_cache=False` (read,
dequantize, convert). "first" fills an empty cache (convert + save); "second" restores it.

  python benchmarks/load_time.py [--spec default] [--dtype float32] [--repeats 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
import jax
from palign_jax.models.loading import load_model
spec, dtype, cache, use_cache = sys.argv[1:5]
start = time.perf_counter()
m = load_model(None if spec == "default" else spec, dtype, cache, use_cache=use_cache == "1")
jax.block_until_ready(m.params)
seconds = time.perf_counter() - start
n = sum(x.size for x in jax.tree.leaves(m.params))
print(json.dumps({"seconds": seconds, "params": n, "from_cache": m.from_cache,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(spec: str, dtype: str, cache: str, use_cache: bool) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, spec, dtype, cache, str(int(use_cache))],
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spec", default="default")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  rows = []
  for _ in range(args.repeats):
    with tempfile.TemporaryDirectory() as cache:
      rows.append(("no cache (baseline)", run(args.spec, args.dtype, cache, False)))
      rows.append(("first (convert+save)", run(args.spec, args.dtype, cache, True)))
      rows.append(("second (orbax restore)", run(args.spec, args.dtype, cache, True)))
  best = {}
  for name, row in rows:
    if name not in best or row["seconds"] < best[name]["seconds"]:
      best[name] = row
  base = best["no cache (baseline)"]["seconds"]
  print(f"spec={args.spec} dtype={args.dtype} best of {args.repeats}")
  print(f"{'load':<24}{'seconds':>9}{'Mparams/s':>11}{'peak RSS MB':>13}{'vs baseline':>13}")
  for name, row in best.items():
    print(f"{name:<24}{row['seconds']:>9.2f}{row['params'] / row['seconds'] / 1e6:>11.1f}"
          f"{row['peak_rss_mb']:>13.0f}{base / row['seconds']:>12.1f}x")


if __name__ == "__main__":
  main()
