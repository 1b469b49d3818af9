"""Does an alpha validated on the fold fits transfer? One subject, one alpha, every fit.

The honest selection validates alpha on the k fold fits (each fitted on the other folds' known
answers). This script shows, for one PAPI subject, what each of those fits, their average (the
`pas` row since 2026-12-03) and the fit on all 120 known items (the paper's deployment) do to
the held-out answers at the same alpha: the answer histogram, the benchmark's composite error,
and how much each fit's steering overlaps the full fit's (kept heads, cosine of the vectors).
It reads the subject's held-out answers, so it is a diagnosis, never part of a selection.

  .venv/bin/python scripts/steering_transfer.py --subject=175839 --alpha=3
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import default as default_config  # noqa: E402
from palign_jax import data  # noqa: E402
from palign_jax import engine as engine_lib  # noqa: E402
from palign_jax.pas import fit as pas_fit  # noqa: E402
from palign_jax.protocol import alignment, metric  # noqa: E402


def fits_of(engine, settings, subject: data.Subjects) -> tuple[pas_fit.PasFit, list]:
  """The full fit and the k fold fits, exactly as `alignment.align_subjects` makes them."""
  known = data.known_answers(subject).astype(np.int32)
  fold = alignment.fold_of_known_items(settings.folds, settings.seed)
  key = jax.random.PRNGKey(settings.seed)
  ids = alignment.subject_seeds(subject.ids)

  def fit(answers, salt):
    return pas_fit.fit_pas(engine.activations(), answers, settings.fit,
                           key=jax.random.fold_in(key, salt), subject_ids=ids)

  return fit(known, 0), [fit(np.where(fold == f, 0, known), f + 1)
                         for f in range(settings.folds)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subject", required=True, help="a PAPI subject id, e.g. 175839")
  parser.add_argument("--alpha", type=float, required=True, help="the steering strength")
  args = parser.parse_args()
  config = default_config.get_config()
  engine = engine_lib.Engine.from_config(config)
  settings = alignment.AlignSettings.from_config(
      config, engine.config.num_layers * engine.config.num_heads)
  subject = data.load_papi_subjects().select([args.subject])
  full, folds = fits_of(engine, settings, subject)
  heldout = data.load_split().heldout
  context = alignment._contexts(engine, data.known_answers(subject).astype(np.int32))
  rows = [("full fit (all 120 items)", full)] + [
      (f"fold fit {f + 1}", fit) for f, fit in enumerate(folds)]
  steering = jax.numpy.stack([pas_fit.steering_for_alpha(f, args.alpha)[0] for _, f in rows])
  scored = np.asarray(engine.score(context, heldout, steering=steering[None]), np.float64)
  scored = scored.reshape(len(rows), len(heldout), -1)  # [fits, items, 5]
  unsteered = np.asarray(engine.score(context, heldout), np.float64)[0]
  average = np.logaddexp.reduce(scored[1:], axis=0) - np.log(len(folds))
  full_vector = np.asarray(steering[0]).ravel()
  full_heads = np.asarray(full.head_mask[0])
  print(f"subject {args.subject}, alpha {args.alpha:g}, {len(heldout)} held-out items\n")
  print("| steered by | kept heads shared with the full fit | cosine with the full fit | "
        "answers 1..5 | composite error |")
  print("| --- | --- | --- | --- | --- |")
  table = [("alpha 0 (few_shot)", None, unsteered)] + [
      (name, fit, scored[j]) for j, (name, fit) in enumerate(rows)] + [
      (f"average of the {len(folds)} fold fits (the pas row)", None, average)]
  for name, fit, log_probs in table:
    predicted = 5 - log_probs.argmax(-1)
    error = metric.trait_errors(subject.ids, predicted[None], subject.answers, heldout).composite
    shared = cosine = ""
    if fit is not None:
      vector = np.asarray(pas_fit.steering_for_alpha(fit, 1.0)[0]).ravel()
      overlap = int((np.asarray(fit.head_mask[0]) & full_heads).sum())
      shared = f"{overlap} of {int(full_heads.sum())}"
      cosine = f"{vector @ full_vector / np.linalg.norm(vector) / np.linalg.norm(full_vector):.2f}"
    histogram = np.bincount(predicted, minlength=6)[1:].tolist()
    print(f"| {name} | {shared} | {cosine} | {histogram} | {float(error[0]):.3f} |")


if __name__ == "__main__":
  main()
