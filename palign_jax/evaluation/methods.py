"""Evaluation methods: the rows of one table, each producing per-subject records.

LLM methods (all read the answer from the next-token distribution over A..E, `readout`):
  * `zero_shot`: the default system prompt, no subject information;
  * `few_shot`: the subject's 120 known answers in the system prompt (the reference's
    wording); identical to PAS with alpha = 0;
  * `personality_prompt`: P², the subject's PAPI description as system prompt;
  * `pas`: few-shot context + steering, alpha chosen by k-fold over the known items (honest);
  * `pas_oracle_test`: the reference's protocol, alpha chosen by the test error itself
    (optimistic; labelled so everywhere).
Non-LLM baselines (`evaluation.baselines`) give the floor. Records are built by
`protocol.records`; `llm_records` yields each one as soon as it is computed, so a caller that
stores them as they come loses nothing finished when a run is killed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from palign_jax import data, prompts, readout
from palign_jax.evaluation import baselines, metrics
from palign_jax.protocol import alignment as alignment_lib
from palign_jax.protocol import records as records_lib

LLM_METHODS = ("zero_shot", "few_shot", "personality_prompt", "pas", "pas_oracle_test")
ALL_METHODS = LLM_METHODS + baselines.BASELINE_METHODS
SWEEP_METHODS = records_lib.SWEEP_METHODS
METHOD_NOTES = {
    "pas": "alpha chosen by k-fold over the known items (honest)",
    "pas_oracle_test": "reference protocol: alpha chosen on the TEST items (optimistic)",
    "few_shot": "PAS with alpha = 0",
    "zero_shot": "no subject information",
    "personality_prompt": "P² description as system prompt",
    "item_mean_loso": "item mean over the other subjects",
    "ridge_cv": "ridge from the 120 known answers, CV over subjects",
}


def selections_for(methods: Sequence[str]) -> tuple[str, ...]:
  """The alpha selections the protocol must run for these methods."""
  return tuple(records_lib.SELECTION_OF[m] for m in ("pas", "pas_oracle_test") if m in methods)


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
      records.append(records_lib.decoded_record(sid, method, {"-": rows[sid]}, answers,
                                                seconds_per_subject=seconds))
  return records


def llm_records(engine, subjects: data.Subjects, methods: Sequence[str],
                settings: alignment_lib.AlignSettings, *, zero_shot_cache: dict,
                progress: Callable[[str], None] | None = None) -> Iterator[dict]:
  """Yields the LLM methods' records for one batch of subjects, each as soon as it exists.

  zero_shot_cache: a dict kept across batches; the zero-shot scores (the same for every
  subject) are computed once per run.
  """
  progress = progress or (lambda _: None)
  heldout = data.load_split().heldout
  if "zero_shot" in methods:
    if "log_probs" not in zero_shot_cache:
      progress("zero_shot")
      start = time.perf_counter()
      zero_shot_cache["log_probs"] = engine.score_systems([prompts.DEFAULT_SYSTEM_PROMPT],
                                                          heldout)[0]
      zero_shot_cache["seconds"] = time.perf_counter() - start
    for sid, answers in zip(subjects.ids, subjects.answers, strict=True):
      yield records_lib.log_probs_record(sid, "zero_shot", zero_shot_cache["log_probs"], answers,
                                         seconds_per_subject=zero_shot_cache["seconds"],
                                         seconds_note="once per run, shared by all subjects")
  if "personality_prompt" in methods:
    descriptions = data.load_descriptions()
    have = [k for k, sid in enumerate(subjects.ids) if sid in descriptions]
    if have:
      progress("personality_prompt")
      start = time.perf_counter()
      log_probs = engine.score_systems(
          [prompts.description_system_prompt(descriptions[subjects.ids[k]]) for k in have],
          heldout)
      seconds = (time.perf_counter() - start) / len(have)
      for row, k in enumerate(have):
        yield records_lib.log_probs_record(subjects.ids[k], "personality_prompt", log_probs[row],
                                           subjects.answers[k], seconds_per_subject=seconds)
  wanted = [m for m in SWEEP_METHODS if m in methods]
  if wanted:
    alignments = alignment_lib.align_subjects(
        engine, engine.activations(), subjects, settings, selections=selections_for(wanted),
        progress=progress)
    for alignment, answers in zip(alignments, subjects.answers, strict=True):
      seconds = sum(alignment.work["stage_seconds"].values()) / len(subjects)
      yield from records_lib.pas_records(alignment, answers, wanted,
                                         seconds_per_subject=seconds)


def row_name(method: str, decoding: str) -> str:
  """The table row of a (method, decoding): the paper's argmax is the plain method name."""
  return method if decoding in ("-", readout.DECODINGS[0]) else f"{method} [{decoding}]"


def summaries_from_records(records: Sequence[dict], methods: Sequence[str],
                           subject_ids: Sequence[str], seed: int = 0
                           ) -> tuple[dict[str, metrics.Summary], dict[str, dict]]:
  """Per (method, decoding) summaries over the given subjects, and per row: mean seconds per
  subject and the letter mass (mean over items and subjects, minimum over both)."""
  by_key = {(r["subject"], r["method"]): r for r in records}
  summaries, extras = {}, {}
  for method in methods:
    rows = [by_key[(s, method)] for s in subject_ids if (s, method) in by_key]
    if not rows:
      continue
    for decoding in rows[0]["decodings"]:
      name = row_name(method, decoding)
      entries = [r["decodings"][decoding] for r in rows]
      errors = np.array([[np.nan if e["errors"][t] is None else e["errors"][t]
                          for t in data.TRAITS] for e in entries], np.float64)
      result = metrics.SubjectErrors(
          ids=tuple(r["subject"] for r in rows), errors=errors,
          n_unparsable=np.array([e["n_unparsable"] for e in entries]),
          n_missing_answers=np.array([e["n_missing_answers"] for e in entries]))
      summaries[name] = metrics.summarize(result, seed=seed)
      masses = [e["letter_mass"] for e in entries if "letter_mass" in e]
      extras[name] = {
          "seconds_per_subject": float(np.mean([r.get("seconds_per_subject", np.nan)
                                                for r in rows])),
          "letter_mass_mean": float(np.mean([m["mean"] for m in masses])) if masses else None,
          "letter_mass_min": float(np.min([m["min"] for m in masses])) if masses else None,
      }
  return summaries, extras
