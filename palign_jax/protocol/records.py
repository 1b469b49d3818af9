"""Result records: one JSON object per (subject, method), the unit the result store keeps.

A record: `{"subject", "method", "decodings": {decoding: {"predictions": [items], "errors":
{A..O}, "sum", "n_unparsable", "n_missing_answers", "letter_mass": {"mean", "min"}}}, ...}`
plus what the method adds (chosen alpha, how it was chosen, kept heads, seconds). The letter
mass is the probability the model gave to the five option letters before renormalisation, over
the items (mean and minimum). Baselines have the single decoding "-" and no letter mass.
`pas_records` turns a `SubjectAlignment` into the few_shot, pas and pas_oracle_test records;
`launch.evaluate` and `launch.align` both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from palign_jax import data, readout
from palign_jax.protocol import metric
from palign_jax.protocol.alignment import SubjectAlignment

SWEEP_METHODS = ("few_shot", "pas", "pas_oracle_test")
SELECTION_OF = {"pas": "kfold_known", "pas_oracle_test": "oracle_test"}
SELECTION_LABELS = {"kfold_known": "kfold_known (k-fold over the known items; honest)",
                    "oracle_test": "oracle_test (chosen on the TEST items; optimistic)"}


def _float(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def decoded_record(subject_id: str, method: str, predictions_by_decoding: dict[str, np.ndarray],
                   answers: np.ndarray, *, heldout: np.ndarray | None = None,
                   log_probs_by_decoding: dict[str, np.ndarray] | None = None, **extra) -> dict:
  """One record.

  Args:
    predictions_by_decoding: decoding -> `int[items]` answers 1..5 on `heldout`.
    answers: `int[300]` the subject's answers (0 = missing).
    heldout: the 0-based test items (default: the benchmark's 180).
    log_probs_by_decoding: decoding -> `[items, 5]` the letter log-probabilities (full
      vocabulary) the predictions were read from, for the letter mass.
  """
  heldout = data.load_split().heldout if heldout is None else heldout
  decodings = {}
  for decoding, predicted in predictions_by_decoding.items():
    entry = {"predictions": [int(p) for p in predicted], "errors": dict.fromkeys(data.TRAITS),
             "sum": None, "n_unparsable": 0, "n_missing_answers": 0}
    if len(predicted):
      scored = metric.trait_errors([subject_id], np.asarray(predicted)[None], answers[None],
                                   heldout)
      entry.update(errors={t: _float(scored.errors[0, k]) for k, t in enumerate(data.TRAITS)},
                   sum=_float(scored.composite[0]),
                   n_unparsable=int(scored.n_unparsable[0]),
                   n_missing_answers=int(scored.n_missing_answers[0]))
    log_probs = (log_probs_by_decoding or {}).get(decoding)
    if log_probs is not None and len(log_probs):
      mass = readout.letter_mass(log_probs)
      entry["letter_mass"] = {"mean": float(mass.mean()), "min": float(mass.min())}
    decodings[decoding] = entry
  return {"subject": subject_id, "method": method, "decodings": decodings, **extra}


def log_probs_record(subject_id: str, method: str, log_probs: np.ndarray, answers: np.ndarray,
                     **extra) -> dict:
  """A record of an LLM method from its letter log-probabilities, in every decoding."""
  return decoded_record(subject_id, method,
                        {d: readout.answers(log_probs, d) for d in readout.DECODINGS}, answers,
                        log_probs_by_decoding=dict.fromkeys(readout.DECODINGS, log_probs),
                        **extra)


def pas_records(alignment: SubjectAlignment, answers: np.ndarray, methods: Sequence[str],
                **extra) -> list[dict]:
  """few_shot / pas / pas_oracle_test records of one subject's alignment (those in `methods`
  whose selection was run). Each decoding reads the predictions at its own chosen alpha."""
  records = []
  common = {"num_labelled": alignment.num_labelled, "probe_valid": alignment.valid,
            "work": alignment.work, **extra}
  heldout = alignment.heldout
  if "few_shot" in methods:
    records.append(log_probs_record(alignment.subject_id, "few_shot",
                                    alignment.test_log_probs[0.0], answers, heldout=heldout,
                                    alpha=0.0, **common))
  for method in ("pas", "pas_oracle_test"):
    selection = SELECTION_OF[method]
    if method not in methods or selection not in alignment.chosen_alpha:
      continue
    alpha = alignment.chosen_alpha[selection]
    predictions = {d: alignment.predictions(a, d) for d, a in alpha.items()}
    record = decoded_record(
        alignment.subject_id, method, predictions, answers, heldout=heldout,
        log_probs_by_decoding={d: alignment.test_log_probs[a] for d, a in alpha.items()},
        alpha=alpha, alpha_selection=SELECTION_LABELS[selection], **common)
    if selection == "kfold_known":
      record["fold_error"] = alignment.fold_error
    record["test_error_by_alpha"] = {d: {str(a): e for a, e in by.items()}
                                     for d, by in alignment.test_error.items()}
    records.append(record)
  return records
