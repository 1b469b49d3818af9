"""Evaluation methods, each producing per-subject records in one format.

LLM methods (all read the answer from the next-token distribution over A..E):
  * `zero_shot`: the default system prompt, no subject information;
  * `few_shot`: the subject's 120 known answers in the system prompt (the
    reference's wording); identical to PAS with alpha = 0;
  * `personality_prompt`: P², the subject's PAPI description as system prompt;
  * `pas`: few-shot context + steering, alpha chosen by k-fold over the known
    items (honest);
  * `pas_oracle_test`: the reference's protocol, alpha chosen by the test error
    itself (optimistic; labelled so everywhere).
Non-LLM baselines (`evaluation.baselines`) give the floor.

A record: {"subject", "method", "decodings": {decoding: {"predictions": [180],
"errors": {A..O}, "sum", "n_unparsable"}}, "alpha", "alpha_selection",
"wall_time_s", ...}. Baselines have the single decoding "-".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from palign_jax import data, prompts
from palign_jax.evaluation import baselines, metrics
from palign_jax.pas import search

LLM_METHODS = ("zero_shot", "few_shot", "personality_prompt", "pas", "pas_oracle_test")
ALL_METHODS = LLM_METHODS + baselines.BASELINE_METHODS
SWEEP_METHODS = ("few_shot", "pas", "pas_oracle_test")
METHOD_NOTES = {
    "pas": "alpha chosen by k-fold over the known items (honest)",
    "pas_oracle_test": "reference protocol: alpha chosen on the TEST items (optimistic)",
    "few_shot": "PAS with alpha = 0",
    "zero_shot": "no subject information",
    "personality_prompt": "P² description as system prompt",
    "item_mean_loso": "item mean over the other subjects",
    "ridge_cv": "ridge from the 120 known answers, CV over subjects",
}


def decoded_record(subject_id: str, method: str, predictions_by_decoding: dict[str, np.ndarray],
                   answers: np.ndarray, *, heldout: np.ndarray | None = None, **extra) -> dict:
  """Builds one record; `predictions_by_decoding[d]` is `int[heldout]` (default: the 180)."""
  decodings = {}
  for decoding, predicted in predictions_by_decoding.items():
    if len(predicted) == 0:  # nothing held out to predict (a user's own answers)
      decodings[decoding] = {"predictions": [], "errors": dict.fromkeys(data.TRAITS),
                             "sum": None, "n_unparsable": 0}
      continue
    scored = metrics.trait_errors([subject_id], predicted[None], answers[None], heldout)
    decodings[decoding] = {
        "predictions": [int(p) for p in predicted],
        "errors": {t: _float(scored.errors[0, k]) for k, t in enumerate(data.TRAITS)},
        "sum": _float(scored.composite[0]),
        "n_unparsable": int(scored.n_unparsable[0]),
    }
  return {"subject": subject_id, "method": method, "decodings": decodings, **extra}


def _float(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def _by_decoding(log_probs: np.ndarray) -> dict[str, np.ndarray]:
  return {d: prompts.letter_probabilities_to_answers(log_probs, d) for d in search.DECODINGS}


def baseline_records(subjects: data.Subjects, methods: Sequence[str], seed: int) -> list[dict]:
  """Baseline records; PAPI subjects are predicted from the other PAPI subjects only."""
  population = data.load_papi_subjects()
  split = data.load_split()
  in_papi = [s in population.ids for s in subjects.ids]
  records = []
  for method in methods:
    start = time.perf_counter()
    full = baselines.predict(method, population.answers, seed=seed)
    rows = {sid: full[population.ids.index(sid)] for sid, ok in
            zip(subjects.ids, in_papi, strict=True) if ok}
    outsiders = [k for k, ok in enumerate(in_papi) if not ok]
    if outsiders:  # a user's own answers: learn from all 300 PAPI subjects
      new = subjects.answers[outsiders]
      if method == "ridge_cv":
        predicted = baselines.ridge_for_new_subjects(population.answers, new, split.known,
                                                     split.heldout, seed=seed)
      elif method == "item_mean_loso":
        predicted = np.broadcast_to(baselines.item_mean(population.answers, split.heldout),
                                    (len(outsiders), len(split.heldout)))
      else:
        predicted = baselines.predict(method, new, seed=seed)
      rows.update({subjects.ids[k]: p for k, p in zip(outsiders, predicted, strict=True)})
    seconds = (time.perf_counter() - start) / max(len(subjects), 1)
    for sid, answers in zip(subjects.ids, subjects.answers, strict=True):
      records.append(decoded_record(sid, method, {"-": rows[sid]}, answers,
                                    wall_time_s=seconds))
  return records


def zero_shot_log_probs(score: search.ScoreFn) -> np.ndarray:
  """`[heldout, 5]`: the same for every subject."""
  return score([prompts.DEFAULT_SYSTEM_PROMPT], data.load_split().heldout, None)[0]


def llm_records(score: search.ScoreFn, activations_fn: Callable[[], np.ndarray],
                subjects: data.Subjects, methods: Sequence[str], settings: search.PasSettings,
                *, zero_shot_cache: dict, progress: Callable[[str], None] | None = None
                ) -> list[dict]:
  """Records of the LLM methods for one batch of subjects."""
  progress = progress or (lambda _: None)
  heldout = data.load_split().heldout
  known = data.known_answers(subjects).astype(np.int64)
  records: list[dict] = []
  if "zero_shot" in methods:
    if "log_probs" not in zero_shot_cache:
      progress("zero_shot")
      start = time.perf_counter()
      zero_shot_cache["log_probs"] = zero_shot_log_probs(score)
      zero_shot_cache["seconds"] = time.perf_counter() - start
    decoded = _by_decoding(zero_shot_cache["log_probs"])
    for sid, answers in zip(subjects.ids, subjects.answers, strict=True):
      records.append(decoded_record(sid, "zero_shot", decoded, answers,
                                    wall_time_s=zero_shot_cache["seconds"]))
  if "personality_prompt" in methods:
    descriptions = data.load_descriptions()
    have = [k for k, sid in enumerate(subjects.ids) if sid in descriptions]
    if have:
      progress("personality_prompt")
      start = time.perf_counter()
      systems = [prompts.description_system_prompt(descriptions[subjects.ids[k]]) for k in have]
      log_probs = score(systems, heldout, None)
      seconds = (time.perf_counter() - start) / len(have)
      for row, k in enumerate(have):
        records.append(decoded_record(subjects.ids[k], "personality_prompt",
                                      _by_decoding(log_probs[row]), subjects.answers[k],
                                      wall_time_s=seconds))
  wanted = [m for m in SWEEP_METHODS if m in methods]
  if wanted:
    start = time.perf_counter()
    sweep = search.run_sweep(score, activations_fn(), known, settings,
                             subject_ids=subjects.ids, with_selection="pas" in wanted,
                             progress=progress)
    seconds = (time.perf_counter() - start) / len(subjects)
    records.extend(sweep_records(sweep, subjects, wanted, settings, seconds))
  return records


def sweep_records(sweep: search.PasSweep, subjects: data.Subjects, methods: Sequence[str],
                  settings: search.PasSettings, seconds_per_subject: float) -> list[dict]:
  """few_shot / pas / pas_oracle_test records from one alpha sweep."""
  alphas = sweep.alphas
  zero = int(np.flatnonzero(alphas == 0)[0]) if (alphas == 0).any() else None
  predictions = {d: sweep.predictions(d) for d in search.DECODINGS}  # [S, A, heldout]
  chosen = {d: sweep.chosen_alpha_index(d) for d in search.DECODINGS}
  records = []
  for s, (sid, answers) in enumerate(zip(subjects.ids, subjects.answers, strict=True)):
    common = {"num_labelled": int(sweep.fit.num_labelled[s]), "probe_valid": bool(
        sweep.fit.valid[s])}
    if "few_shot" in methods and zero is not None:
      records.append(decoded_record(
          sid, "few_shot", {d: predictions[d][s, zero] for d in search.DECODINGS}, answers,
          heldout=sweep.heldout, wall_time_s=seconds_per_subject / len(alphas)))
    if "pas" in methods:
      records.append(decoded_record(
          sid, "pas", {d: predictions[d][s, chosen[d][s]] for d in search.DECODINGS}, answers,
          heldout=sweep.heldout, alpha={d: float(alphas[chosen[d][s]]) for d in search.DECODINGS},
          alpha_selection=f"kfold_known(k={settings.folds})",
          validation_error={d: [float(v) for v in sweep.validation_error[d][s]]
                            for d in search.DECODINGS},
          wall_time_s=seconds_per_subject, **common))
    if "pas_oracle_test" in methods:
      best, test_errors = {}, {}
      for d in search.DECODINGS:
        scored = metrics.trait_errors([sid] * len(alphas), predictions[d][s],
                                      np.broadcast_to(answers, (len(alphas), len(answers))),
                                      sweep.heldout)
        composite = np.nan_to_num(scored.composite, nan=np.inf)
        best[d] = int(np.argmin(composite))
        test_errors[d] = [float(v) for v in scored.composite]
      records.append(decoded_record(
          sid, "pas_oracle_test", {d: predictions[d][s, best[d]] for d in search.DECODINGS},
          answers, heldout=sweep.heldout,
          alpha={d: float(alphas[best[d]]) for d in search.DECODINGS},
          alpha_selection="oracle_test (chosen on the test items)", test_error_by_alpha=test_errors,
          wall_time_s=seconds_per_subject, **common))
  return records


def summaries_from_records(records: Sequence[dict], methods: Sequence[str],
                           subject_ids: Sequence[str], seed: int = 0
                           ) -> tuple[dict[str, metrics.Summary], dict[str, float]]:
  """Per (method, decoding) summaries over the given subjects, and mean wall time."""
  by_key = {(r["subject"], r["method"]): r for r in records}
  summaries, seconds = {}, {}
  for method in methods:
    rows = [by_key[(s, method)] for s in subject_ids if (s, method) in by_key]
    if not rows:
      continue
    for decoding in rows[0]["decodings"]:
      name = method if decoding in ("-", "argmax") else f"{method} [{decoding}]"
      errors = np.array([[np.nan if r["decodings"][decoding]["errors"][t] is None else
                          r["decodings"][decoding]["errors"][t] for t in data.TRAITS]
                         for r in rows], np.float64)
      result = metrics.SubjectErrors(
          ids=tuple(r["subject"] for r in rows), errors=errors,
          n_unparsable=np.array([r["decodings"][decoding]["n_unparsable"] for r in rows]),
          n_missing_answers=np.zeros(len(rows), int))
      summaries[name] = metrics.summarize(result, seed=seed)
      seconds[name] = float(np.mean([r.get("wall_time_s", np.nan) for r in rows]))
  return summaries, seconds
