"""What XLA compiled for the sweep's two programs: instruction counts and bytes written, by op.

Deterministic, unlike timings on a shared box: run it in two trees (e.g. a `git worktree` of a
baseline commit, with `cd` there) and compare. It compiles `scoring.encode_prefixes` for one
1,408-token few-shot context and `scoring.score_on_prefixes` for one question batch on its
cache (the real SmolLM2), and counts the optimised HLO's instructions by opcode and the bytes
of their outputs. A scanned layer body appears once, so the figures are per program text, not
per executed layer.

    python benchmarks/hlo_ops.py
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np

OPS = ("fusion", "dot", "copy", "transpose", "concatenate", "slice", "dynamic-slice",
       "dynamic-update-slice", "custom-call")
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


def count_ops(hlo_text: str) -> tuple[collections.Counter, collections.Counter]:
  """(instructions, output bytes) by opcode, over every computation of `hlo_text`."""
  counts, written = collections.Counter(), collections.Counter()
  pattern = r"^\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\("
  for dtype, dims, op in re.findall(pattern, hlo_text, re.M):
    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    counts[op] += 1
    written[op] += size * BYTES.get(dtype, 4)
  return counts, written


def main():
  from bench_ab import sweep_programs  # this file's directory; palign_jax from the working one

  built = sweep_programs()
  programs = {name: built[name] for name in ("encode", "score")}
  print(f"# hlo_ops: {os.getcwd()}; instructions (MB written) by opcode")
  print("| program | all | " + " | ".join(OPS) + " |")
  print("|---" * (len(OPS) + 2) + "|")
  for name, (fn, args) in programs.items():
    counts, written = count_ops(fn.lower(*args).compile().as_text())
    cells = [f"{counts[op]} ({written[op] / 1e6:.1f})" for op in OPS]
    print(f"| {name} | {sum(counts.values())} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
