"""Probe fitting for PAS: batched JAX L-BFGS vs the reference's scikit-learn loop.

Problem: SmolLM2-135M-shaped head outputs (30 layers x 9 heads x 64 dims) for the 120
known items in both answer versions, and 300 subjects: 81,000 logistic probes. The
activations are SYNTHETIC (no model is run): per head, an item component shared by an
item's two versions, an answer-letter component, a trait direction of random strength
whose sign follows the item's key and the letter, and noise; then each dimension is
scaled by exp(scale_sd * normal) (`--scale-sd`, default 1), as real head outputs are
far from isotropic. Answers follow a latent trait level times the item key plus noise,
with 5% missing, so 3s and blanks drop items as in real data. Both methods get identical
vectors, labels and pair splits.

Baseline: the reference's loop (PAlign/pas.py `train_probes`), per subject and head
`LogisticRegression(random_state=42, max_iter=1000).fit`, two `predict`s and two
`accuracy_score`s, with single-threaded BLAS (its fastest setting on this box). It takes
minutes per subject, so it runs on `--sample-subjects` random subjects before the JAX run
and as many after it (the box is shared and its load drifts), and the mean time per
probe is extrapolated linearly to all subjects (stated in the output).

Each method runs in its own child process (same machine, same invocation) so that peak
RSS is per method. Usage:
  python benchmarks/bench_probes.py [--subjects 300] [--sample-subjects 3] [--scale-sd 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# Runs as `python benchmarks/bench_probes.py` from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ITEMS, LAYERS, HEADS, DIM = 120, 30, 9, 64


def make_problem(subjects: int, scale_sd: float, seed: int = 0):
  """Synthetic activations `[items, 2, L, H, D]` float32 and answers `[subjects, items]`.

  `scale_sd`: each (head, dim) is scaled by `exp(scale_sd * normal)`, since real head
  outputs are far from isotropic; 0 gives isotropic features.
  """
  rng = np.random.default_rng(seed)
  key_sign = rng.choice([-1.0, 1.0], ITEMS)
  item = rng.normal(size=(ITEMS, 1, LAYERS, HEADS, DIM))
  letter = rng.normal(size=(1, 2, LAYERS, HEADS, DIM))
  strength = rng.uniform(0.0, 0.3, size=(LAYERS, HEADS, 1))
  trait = rng.normal(size=(LAYERS, HEADS, DIM)) * strength
  agree = np.array([1.0, -1.0])[None, :, None, None, None] * key_sign[:, None, None, None, None]
  acts = (0.5 * item + 0.5 * letter + agree * trait
          + 0.3 * rng.normal(size=(ITEMS, 2, LAYERS, HEADS, DIM)))
  acts = (acts * np.exp(scale_sd * rng.normal(size=(LAYERS, HEADS, DIM)))).astype(np.float32)
  level = rng.normal(size=subjects)
  answers = np.clip(np.round(3 + 1.5 * level[:, None] * key_sign
                             + rng.normal(size=(subjects, ITEMS))), 1, 5).astype(np.int32)
  answers[rng.uniform(size=answers.shape) < 0.05] = 0
  return acts, answers


def _labels_and_split(acts, answers):
  import jax
  import jax.numpy as jnp

  from palign_jax.pas import labels
  x = labels.flatten_activations(jnp.asarray(acts))
  lab = labels.pair_labels(answers)
  keys = labels.subject_keys(jax.random.key(0), jnp.arange(len(answers)))
  train, val = labels.train_val_split(keys, lab.labelled)
  return x, lab.labels, train, val


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(subjects: int, scale_sd: float) -> dict:
  import jax

  from palign_jax.pas import fit as pas_fit
  from palign_jax.pas import probes
  settings = pas_fit.FitSettings(top_k=24, c=1.0, val_fraction=0.4, split_by="pairs",
                                 min_items=2, max_iter=200, tol=1e-6)  # configs/default.py
  acts, answers = make_problem(subjects, scale_sd)
  x, y, train, val = _labels_and_split(acts, answers)
  jax.block_until_ready((x, y, train, val))
  out = {}
  for name in ("first call (compile + run)", "second call"):
    start, cpu = time.perf_counter(), time.process_time()
    fit = jax.block_until_ready(probes.fit_probes(x, y, train, val))
    out[name] = time.perf_counter() - start
    out[name + " cpu"] = time.process_time() - cpu
  iters = np.asarray(fit.iterations)
  # The loop for a head runs until its slowest subject stops.
  loop_iters = iters.reshape(subjects, -1).max(axis=0)
  n = x.shape[0]
  gemm_flop = float(loop_iters.sum()) * 2 * (2 * subjects * n * (DIM + 1))
  start = time.perf_counter()
  pas = jax.block_until_ready(pas_fit.fit_pas(acts, answers, settings, key=jax.random.key(0)))
  pas_first = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(pas_fit.fit_pas(acts, answers, settings, key=jax.random.key(0)))
  out.update({
      "fit_pas first call": pas_first,
      "fit_pas second call": time.perf_counter() - start,
      "probes": subjects * LAYERS * HEADS,
      "converged": float(np.asarray(fit.converged).mean()),
      "iterations mean": float(iters.mean()),
      "iterations max": int(iters.max()),
      "gemm_gflop": gemm_flop / 1e9,
      "mean val acc of kept heads": float(
          np.asarray(pas.val_accuracy)[np.asarray(pas.head_mask)].mean()),
      "peak_rss_mib": _peak_rss_mib(),
      "devices": str(jax.devices()),
  })
  return out


def run_sklearn(subjects: int, scale_sd: float, sample: int, seed: int) -> dict:
  import warnings

  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score
  acts, answers = make_problem(subjects, scale_sd)
  x, y, train, val = (np.asarray(a) for a in _labels_and_split(acts, answers))
  chosen = np.random.default_rng(seed).choice(subjects, sample, replace=False)
  warnings.simplefilter("ignore", ConvergenceWarning)
  count, iters = 0, []
  start, cpu = time.perf_counter(), time.process_time()
  for s in chosen:
    x_train, x_val = x[train[s]], x[val[s]]
    y_train, y_val = y[s, train[s]], y[s, val[s]]
    for layer in range(LAYERS):
      for head in range(HEADS):
        clf = LogisticRegression(random_state=42, max_iter=1000).fit(
            x_train[:, layer, head], y_train)
        accuracy_score(y_val, clf.predict(x_val[:, layer, head]))
        accuracy_score(y_train, clf.predict(x_train[:, layer, head]))
        iters.append(int(clf.n_iter_[0]))
        count += 1
  elapsed = time.perf_counter() - start
  return {"sampled subjects": [int(s) for s in chosen], "probes": count, "seconds": elapsed,
          "cpu seconds": time.process_time() - cpu,
          "iterations mean": float(np.mean(iters)), "peak_rss_mib": _peak_rss_mib()}


def _child(method: str, args, seed: int = 0) -> dict:
  cmd = [sys.executable, __file__, "--child", method, "--subjects", str(args.subjects),
         "--sample-subjects", str(args.sample_subjects), "--scale-sd", str(args.scale_sd),
         "--seed", str(seed)]
  env = dict(os.environ)
  if method == "sklearn":
    # Single-threaded BLAS is the baseline's best setting here: on 2 shared cores the
    # default threading made each tiny fit several times slower.
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
  done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--subjects", type=int, default=300)
  parser.add_argument("--sample-subjects", type=int, default=3)
  parser.add_argument("--scale-sd", type=float, default=1.0,
                      help="log-normal spread of per-dimension scales (0: isotropic)")
  parser.add_argument("--child", choices=["jax", "sklearn"])
  parser.add_argument("--seed", type=int, default=0, help="(child) which subjects to sample")
  args = parser.parse_args()
  if args.child == "jax":
    print(json.dumps(run_jax(args.subjects, args.scale_sd)))
    return
  if args.child == "sklearn":
    print(json.dumps(run_sklearn(args.subjects, args.scale_sd, args.sample_subjects,
                                 args.seed)))
    return

  # The box is shared: the baseline is sampled before and after the JAX run and averaged.
  before = _child("sklearn", args, seed=1)
  jx = _child("jax", args)
  after = _child("sklearn", args, seed=2)
  sk = {key: before[key] + after[key] for key in ("sampled subjects", "probes", "seconds",
                                                   "cpu seconds")}
  sk["iterations mean"] = (before["iterations mean"] + after["iterations mean"]) / 2
  sk["peak_rss_mib"] = max(before["peak_rss_mib"], after["peak_rss_mib"])
  total = args.subjects * LAYERS * HEADS
  sk_per_probe = sk["seconds"] / sk["probes"]
  sk_total = sk_per_probe * total
  steady = jx["second call"]
  print(f"PAS probes: {args.subjects} subjects x {LAYERS * HEADS} heads = {total} probes, "
        f"D={DIM}, {2 * ITEMS} vectors (synthetic activations, per-dimension scale sd "
        f"{args.scale_sd})")
  print(f"JAX devices: {jx['devices']}")
  print()
  print("| method | wall time (s) | probes/s | peak RSS (MiB) | notes |")
  print("|---|---|---|---|---|")
  print(f"| scikit-learn loop (reference) | {sk_total:.0f} (extrapolated) | "
        f"{1 / sk_per_probe:.0f} | {sk['peak_rss_mib']:.0f} | measured "
        f"{sk['probes']} probes ({len(sk['sampled subjects'])} subjects, half before and "
        f"half after the JAX run: {before['seconds']:.1f} s + {after['seconds']:.1f} s), "
        f"{sk['iterations mean']:.1f} lbfgs iterations mean |")
  print(f"| JAX fit_probes, steady | {steady:.2f} | {total / steady:.0f} | "
        f"{jx['peak_rss_mib']:.0f} | {jx['iterations mean']:.1f} L-BFGS iterations mean, "
        f"{jx['iterations max']} max; {jx['gemm_gflop'] / steady:.1f} GFLOP/s in the "
        f"matrix products |")
  print(f"| JAX fit_probes, first call | {jx['first call (compile + run)']:.2f} | "
        f"{total / jx['first call (compile + run)']:.0f} | | includes compilation |")
  print(f"| JAX fit_pas (probes + directions + sigma), steady | "
        f"{jx['fit_pas second call']:.2f} | {total / jx['fit_pas second call']:.0f} | | "
        f"first call {jx['fit_pas first call']:.2f} s |")
  print()
  sk_cpu_total = sk["cpu seconds"] / sk["probes"] * total
  jx_cpu = jx["second call cpu"]
  print(f"speed-up, steady: {sk_total / steady:.0f}x; including compilation: "
        f"{sk_total / jx['first call (compile + run)']:.0f}x")
  # CPU time (all threads) is less sensitive to other jobs on the box than wall time.
  print(f"CPU seconds (all threads): scikit-learn {sk_cpu_total:.0f} (extrapolated), "
        f"JAX steady {jx_cpu:.1f}; ratio {sk_cpu_total / jx_cpu:.0f}x")
  print(f"JAX probes converged: {jx['converged']:.4f}; mean validation accuracy of kept "
        f"heads: {jx['mean val acc of kept heads']:.3f}")


if __name__ == "__main__":
  main()
