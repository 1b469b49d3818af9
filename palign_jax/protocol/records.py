"""Result records: one JSON object per (subject, method), the unit the result store keeps.

A record: `{"subject", "method", "decodings": {decoding: {"predictions": [items], "errors":
{A..O}, "sum", "n_unparsable", "n_missing_answers", "letter_mass": {"mean", "min"}, "note"?}},
...}` plus what the method adds (chosen alpha, how it was chosen, kept heads, seconds). The
letter mass is the probability the model gave to the five option letters before
renormalisation, over the items (mean and minimum); "note" says a decoding fell back to the
median. `few_shot` and `pas` also have the decoding `"chosen"`: the readout chosen per subject by
k-fold over the known items (or fixed in the config), with its name under "decoding"; it is
their headline row. Baselines have the single decoding "-" and no letter mass. `pas_records`
turns a `SubjectAlignment` into the few_shot, pas and pas_oracle_test records, `dpo_record` a
`protocol.dpo.SubjectDpo` into the dpo record (with "chosen" too, and a record-level "note"
when the subject was skipped or its training stopped); `launch.evaluate` and `launch.align`
both use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from palign_jax import data, readout
from palign_jax.protocol import metric
from palign_jax.protocol.alignment import SubjectAlignment
from palign_jax.protocol.dpo import SubjectDpo

SWEEP_METHODS = ("few_shot", "pas", "pas_oracle_test", "pas_probes")
SELECTION_OF = {"pas": "kfold_known", "pas_oracle_test": "oracle_test"}
SELECTION_LABELS = {"kfold_known": "kfold_known (k-fold over the known items; honest)",
                    "oracle_test": "oracle_test (chosen on the TEST items; optimistic)"}
STEERING_LABELS = {
    "folds": "cross-fitted: the k fold fits the alpha was chosen on, their letter "
             "distributions averaged",
    "full": "the fit on all known items (the paper's deployment)"}
CHOSEN = "chosen"
GENERATED = "generated"  # the paper's readout: greedy text, parsed (opt-in)


def _float(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def decoded_entry(subject_id: str, predicted: np.ndarray, answers: np.ndarray, *,
                  heldout: np.ndarray | None = None, log_probs: np.ndarray | None = None,
                  note: str | None = None) -> dict:
  """One decoding of a record: predictions `int[items]` on `heldout` scored against `answers`
  (`int[300]`), and the letter mass of the `log_probs` `[items, 5]` they were read from."""
  heldout = data.load_split().heldout if heldout is None else heldout
  entry = {"predictions": [int(p) for p in predicted], "errors": dict.fromkeys(data.TRAITS),
           "sum": None, "n_unparsable": 0, "n_missing_answers": 0}
  if len(predicted):
    scored = metric.trait_errors([subject_id], np.asarray(predicted)[None], answers[None],
                                 heldout)
    entry.update(errors={t: _float(scored.errors[0, k]) for k, t in enumerate(data.TRAITS)},
                 sum=_float(scored.composite[0]), n_unparsable=int(scored.n_unparsable[0]),
                 n_missing_answers=int(scored.n_missing_answers[0]))
  if log_probs is not None and len(log_probs):
    mass = readout.letter_mass(log_probs)
    entry["letter_mass"] = {"mean": float(mass.mean()), "min": float(mass.min())}
  if note:
    entry["note"] = note
  return entry


def decoded_record(subject_id: str, method: str, predictions_by_decoding: dict[str, np.ndarray],
                   answers: np.ndarray, *, heldout: np.ndarray | None = None, **extra) -> dict:
  """A record from predictions alone (the non-LLM baselines)."""
  decodings = {d: decoded_entry(subject_id, p, answers, heldout=heldout)
               for d, p in predictions_by_decoding.items()}
  return {"subject": subject_id, "method": method, "decodings": decodings, **extra}


def log_probs_record(subject_id: str, method: str, log_probs: np.ndarray, answers: np.ndarray,
                     decodings: Sequence[str], *, prior: np.ndarray | None = None,
                     known_log_probs: np.ndarray | None = None,
                     heldout: np.ndarray | None = None, **extra) -> dict:
  """A record of an LLM method from its letter log-probabilities, in every decoding.

  prior: `[5]` the content-free prior of the context (calibrated decodings);
  known_log_probs: `[120, 5]` the same model's scores on the known items without their answers
    in the context (`matched`, fitted against the subject's known answers).
  """
  known = answers[data.load_split().known]
  match = None if known_log_probs is None else (known_log_probs, known)
  entries = {}
  for d in decodings:
    predicted, note = readout.decode(log_probs, d, prior=prior, match=match)
    entries[d] = decoded_entry(subject_id, predicted, answers, heldout=heldout,
                               log_probs=log_probs, note=note)
  return {"subject": subject_id, "method": method, "decodings": entries, **extra}


def _with_chosen(entries: dict, decoding: str) -> dict:
  return {CHOSEN: dict(entries[decoding], decoding=decoding), **entries}


def pas_records(alignment: SubjectAlignment, answers: np.ndarray, methods: Sequence[str],
                **extra) -> list[dict]:
  """few_shot / pas / pas_oracle_test / pas_probes records of one subject's alignment (those in
  `methods` that were computed). Each decoding reads the predictions at its own chosen alpha;
  pas records carry the `selection` that chose it."""
  records = []
  common = {"num_labelled": alignment.num_labelled, "probe_valid": alignment.valid,
            "work": alignment.work, **extra}
  sid, heldout = alignment.subject_id, alignment.heldout

  def entry(alpha, decoding, fits="full"):
    predicted, note = alignment.decoded(alpha, decoding, fits)
    return decoded_entry(sid, predicted, answers, heldout=heldout,
                         log_probs=alignment.test_rows(fits)[0][float(alpha)], note=note)

  def with_generated(entries, row):
    if row in alignment.generated:
      agreement = alignment.generated_agreement[row]
      entries[GENERATED] = decoded_entry(
          sid, alignment.generated[row], answers, heldout=heldout,
          note=f"greedy text parsed as the reference does; agrees with the argmax letter on "
               f"{agreement['agree']} of {agreement['rows']} items, {agreement['unparsable']} "
               "unparsable (counted)")
      entries[GENERATED]["agreement_with_argmax"] = agreement
    return entries

  if "few_shot" in methods:
    entries = with_generated({d: entry(0.0, d) for d in alignment.decodings}, "few_shot")
    if "few_shot" in alignment.chosen_decoding:
      entries = _with_chosen(entries, alignment.chosen_decoding["few_shot"])
    records.append({"subject": sid, "method": "few_shot", "decodings": entries, "alpha": 0.0,
                    **common})
  for method in ("pas", "pas_oracle_test"):
    selection = SELECTION_OF[method]
    if method not in methods or selection not in alignment.chosen_alpha:
      continue
    alpha = alignment.chosen_alpha[selection]
    # The honest row is steered by the fold fits its alpha was validated on (cross-fitting).
    fits = "folds" if selection == "kfold_known" else "full"
    entries = {d: entry(a, d, fits) for d, a in alpha.items()}
    record = {"subject": sid, "method": method, "alpha": dict(alpha),
              "alpha_selection": SELECTION_LABELS[selection], **common,
              "steering": STEERING_LABELS[fits]}
    if method == "pas" and "pas" in alignment.chosen_decoding:
      decoding = alignment.chosen_decoding["pas"]
      entries = _with_chosen(entries, decoding)
      record["alpha"][CHOSEN] = alpha[decoding]
    record["decodings"] = with_generated(entries, "pas") if method == "pas" else entries
    if selection == "kfold_known":
      record["fold_error"] = alignment.fold_error
      record["selection"] = alignment.selection
    record["test_error_by_alpha"] = {d: {str(a): e for a, e in by.items()}
                                     for d, by in alignment.test_error.items()}
    records.append(record)
  if "pas_probes" in methods and alignment.probe_predictions is not None:
    record = decoded_record(sid, "pas_probes", {"-": alignment.probe_predictions}, answers,
                            heldout=heldout, **common)
    if alignment.probe_note:
      record["note"] = alignment.probe_note
    records.append(record)
  return records


def _floats(values) -> list:
  """A nested array as lists of floats, NaN as None (JSON has no NaN)."""
  values = np.asarray(values, np.float64)
  if values.ndim == 0:
    return _float(float(values))
  return [_floats(v) for v in values]


def dpo_record(result: SubjectDpo, answers: np.ndarray, **extra) -> dict:
  """The dpo record of one subject (`answers` `int[300]`, only the held-out ones are read):
  every decoding of the test items under the adapter at the chosen steps, and "chosen", the
  readout chosen with the steps on the known items (the headline row). "note" says why a
  subject was not trained (no usable pairs) or stopped early; absent when nothing happened."""
  record = log_probs_record(result.subject_id, "dpo", result.test_log_probs, answers,
                            result.decodings, prior=result.test_prior,
                            known_log_probs=result.known_log_probs, heldout=result.heldout)
  record["decodings"] = _with_chosen(record["decodings"], result.chosen_decoding)
  record.update(
      trained=result.trained, num_pairs=result.num_pairs, rejected_rule=result.rejected_rule,
      chosen_steps=result.chosen_steps,
      chosen_learning_rate=_float(result.chosen_learning_rate),
      candidate_steps=[int(c) for c in result.candidate_steps],
      learning_rates=_floats(result.learning_rates),
      step_selection=SELECTION_LABELS["kfold_known"],
      fold_error={d: _floats(e) for d, e in result.fold_error.items()},
      selection=result.selection,
      loss=_floats(result.loss), work=result.work)
  if result.note:
    record["note"] = result.note
  record.update(extra)
  return record
