"""Evaluation methods: the rows of one table, each producing per-subject records.

LLM methods (all read the answer from the next-token distribution over A..E, `readout`):
  * `zero_shot`: the default system prompt, no subject information;
  * `few_shot`: the subject's 120 known answers in the system prompt (the reference's
    wording); identical to PAS with alpha = 0;
  * `personality_prompt`: P², the subject's PAPI description as system prompt;
  * `pas`: few-shot context + steering, alpha chosen by k-fold over the known items (honest);
  * `pas_oracle_test`: the reference's protocol, alpha chosen by the test error itself
    (optimistic; labelled so everywhere);
  * `pas_probes`: a diagnostic beside PAS, not PAS: the subject's own probes (fitted on the
    known items) read on the held-out items' head outputs, averaged over the kept heads and
    mapped to 1..5 on the known items out of fold; no generation. It says whether the person
    is linearly present in the heads even where steering fails to express it;
  * `dpo` (only when asked for, `--methods=...,dpo`: it trains a LoRA adapter per subject, far
    slower than the rest on a CPU): DPO on preference pairs from the known answers, the number
    of steps chosen by k-fold over the known items (`protocol.dpo`).
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
from palign_jax.protocol import dpo as dpo_lib
from palign_jax.protocol import records as records_lib

# The model's rows run by default (configs/default.py lists them).
LLM_METHODS = ("zero_shot", "few_shot", "personality_prompt", "pas", "pas_oracle_test",
               "pas_probes")
# Model rows run only when named in --methods: DPO trains adapters, far slower than the other
# rows on a CPU (benchmarks/RESULTS_dpo.md).
OPT_IN_METHODS = ("dpo",)
MODEL_METHODS = LLM_METHODS + OPT_IN_METHODS  # every row that needs the model
ALL_METHODS = MODEL_METHODS + baselines.BASELINE_METHODS
SWEEP_METHODS = records_lib.SWEEP_METHODS
METHOD_NOTES = {
    "pas": "alpha chosen by k-fold over the known items (honest)",
    "pas_oracle_test": "reference protocol: alpha chosen on the TEST items (optimistic)",
    "few_shot": "PAS with alpha = 0",
    "pas_probes": "diagnostic: the subject's probes read on the test items' heads (no "
                  "generation)",
    "zero_shot": "no subject information",
    "personality_prompt": "P² description as system prompt",
    "dpo": "LoRA DPO on the known answers, steps chosen by k-fold on the known items",
    "item_mean_loso": "item mean over the other subjects",
    "ridge_cv": "ridge from the 120 known answers, CV over subjects",
}


MAX_SUBJECT_NOTES = 3  # per table row; every note stays in records.jsonl and results.json


def dpo_settings_for(config, methods: Sequence[str]) -> dpo_lib.DpoSettings | None:
  """The DPO settings when `methods` has dpo (checked now, before any work), else None."""
  return dpo_lib.DpoSettings.from_config(config) if "dpo" in methods else None


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
                progress: Callable[[str], None] | None = None,
                dpo_settings: dpo_lib.DpoSettings | None = None) -> Iterator[dict]:
  """Yields the LLM methods' records for one batch of subjects, each as soon as it exists.

  zero_shot_cache: a dict kept across batches; the zero-shot scores (the same for every
  subject) are computed once per run.
  dpo_settings: needed when `methods` has dpo (`dpo_settings_for`).
  """
  if "dpo" in methods and dpo_settings is None:
    raise ValueError("llm_records: the dpo method needs dpo_settings (dpo_settings_for)")
  progress = progress or (lambda _: None)
  split = data.load_split()
  decodings = settings.decodings
  if "zero_shot" in methods:
    if "log_probs" not in zero_shot_cache:
      # One context for everybody: the held-out and the known items are scored once per run;
      # the known items feed the `matched` readout (their answers are never in this context).
      progress("zero_shot")
      start = time.perf_counter()
      items = np.concatenate([split.heldout, split.known])
      log_probs, prior = engine.score_systems([prompts.DEFAULT_SYSTEM_PROMPT], items,
                                              content_free=True)
      zero_shot_cache.update(log_probs=log_probs[0, :len(split.heldout)],
                             known_log_probs=log_probs[0, len(split.heldout):], prior=prior[0],
                             seconds=time.perf_counter() - start)
    for sid, answers in zip(subjects.ids, subjects.answers, strict=True):
      yield records_lib.log_probs_record(
          sid, "zero_shot", zero_shot_cache["log_probs"], answers, decodings,
          prior=zero_shot_cache["prior"], known_log_probs=zero_shot_cache["known_log_probs"],
          seconds_per_subject=zero_shot_cache["seconds"],
          seconds_note="once per run, shared by all subjects")
  if "personality_prompt" in methods:
    descriptions = data.load_descriptions()
    have = [k for k, sid in enumerate(subjects.ids) if sid in descriptions]
    if have:
      progress("personality_prompt")
      start = time.perf_counter()
      log_probs, prior = engine.score_systems(
          [prompts.description_system_prompt(descriptions[subjects.ids[k]]) for k in have],
          split.heldout, content_free=True)
      seconds = (time.perf_counter() - start) / len(have)
      # `matched` would need this context's scores on the known items: 120 more questions
      # per subject, so P² is read out without it.
      p2_decodings = [d for d in decodings if d != "matched"]
      for row, k in enumerate(have):
        yield records_lib.log_probs_record(
            subjects.ids[k], "personality_prompt", log_probs[row], subjects.answers[k],
            p2_decodings, prior=prior[row], seconds_per_subject=seconds)
  wanted = [m for m in SWEEP_METHODS if m in methods]
  if "pas_probes" in wanted:
    progress("pas_probes: head outputs on the test items (once per model)")
  if wanted:
    alignments = alignment_lib.align_subjects(
        engine, engine.activations(), subjects, settings, selections=selections_for(wanted),
        heldout_activations=(engine.activations("heldout") if "pas_probes" in wanted
                             else None),
        score_test=any(m != "pas_probes" for m in wanted), progress=progress)
    for alignment, answers in zip(alignments, subjects.answers, strict=True):
      seconds = sum(alignment.work["stage_seconds"].values()) / len(subjects)
      yield from records_lib.pas_records(alignment, answers, wanted,
                                         seconds_per_subject=seconds)
  if "dpo" in methods:
    results = dpo_lib.align_subjects(engine, subjects, dpo_settings, progress=progress)
    for result, answers in zip(results, subjects.answers, strict=True):
      seconds = sum(result.work["stage_seconds"].values()) / len(subjects)
      yield records_lib.dpo_record(result, answers, seconds_per_subject=seconds)


def row_name(method: str, decoding: str, decodings: Sequence[str] = ()) -> str | None:
  """The table row of a (method, decoding). The plain method name is its headline readout: the
  decoding chosen per subject on the known items ("chosen") where the method has one, else the
  paper's argmax; every other decoding is `method [decoding]`."""
  headline = records_lib.CHOSEN if records_lib.CHOSEN in decodings else readout.DECODINGS[0]
  if decoding in ("-", headline):
    return method
  return f"{method} [{decoding}]"


def row_note(row: str, extra: dict) -> str:
  """The notes column of a table row: the method's note, then its subjects' own notes (a
  skipped or stopped DPO subject), at most MAX_SUBJECT_NOTES of them."""
  notes = [METHOD_NOTES.get(row.split(" ")[0], "")]
  subject_notes = extra.get("subject_notes") or []
  notes += subject_notes[:MAX_SUBJECT_NOTES]
  if len(subject_notes) > MAX_SUBJECT_NOTES:
    notes.append(f"{len(subject_notes) - MAX_SUBJECT_NOTES} more subjects' notes in "
                 "results.json")
  return "; ".join(n for n in notes if n).replace("|", "/")  # a pipe would split the cell


def _row_entries(records: Sequence[dict], methods: Sequence[str], subject_ids: Sequence[str]):
  """Yields `(row name, records, entries)` per (method, decoding), subjects in order."""
  by_key = {(r["subject"], r["method"]): r for r in records}
  for method in methods:
    rows = [by_key[(s, method)] for s in subject_ids if (s, method) in by_key]
    if not rows:
      continue
    for decoding in rows[0]["decodings"]:
      yield (row_name(method, decoding, rows[0]["decodings"]), rows,
             [r["decodings"][decoding] for r in rows])


def summaries_from_records(records: Sequence[dict], methods: Sequence[str],
                           subject_ids: Sequence[str], seed: int = 0
                           ) -> tuple[dict[str, metrics.Summary], dict[str, dict]]:
  """Per (method, decoding) summaries over the given subjects, and per row: mean seconds per
  subject, the letter mass (mean over items and subjects, minimum over both) and, on the
  method's headline row, the subjects' record notes ("subject: note", see `row_note`)."""
  summaries, extras = {}, {}
  for name, rows, entries in _row_entries(records, methods, subject_ids):
    method = rows[0]["method"]
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
    subject_notes = [f"subject {r['subject']}: {r['note']}" for r in rows if r.get("note")]
    if name == method and subject_notes:
      extras[name]["subject_notes"] = subject_notes
  return summaries, extras


# What a user must see to know whether aligning helped: each aligned row against the same
# model unaligned (few_shot: the same context, alpha 0, the same readout as pas) and against
# the simplest floor, "always answer 3". The calibrated and matched readouts are compared too.
ALIGNED_ROWS = ("pas", "dpo", "pas_probes")
VERDICT_REFERENCES = ("few_shot", "constant_3")
COMPARED_DECODINGS = ("calibrated", "calibrated_median", "matched")


def verdict_rows(rows: Sequence[str]) -> list[tuple[str, str]]:
  """`(row, reference)` pairs to compare, of those present in `rows`."""
  candidates = [r for r in rows if r in ALIGNED_ROWS]
  candidates += [r for r in rows if r.split(" ")[0] in ("few_shot", "pas")
                 and any(r.endswith(f"[{d}]") for d in COMPARED_DECODINGS)]
  pairs = [(r, ref) for r in candidates
           for ref in (("zero_shot",) if r == "dpo" else ()) + VERDICT_REFERENCES
           if ref in rows and ref != r]
  if "few_shot" in rows and "constant_3" in rows:
    pairs.insert(0, ("few_shot", "constant_3"))
  return pairs


def paired_verdicts(records: Sequence[dict], methods: Sequence[str],
                    subject_ids: Sequence[str], seed: int = 0) -> list[metrics.Paired]:
  """Per-subject paired comparisons (`verdict_rows`) over the subjects both rows have."""
  sums = {}
  for name, rows, entries in _row_entries(records, methods, subject_ids):
    by_subject = {r["subject"]: e["sum"] for r, e in zip(rows, entries, strict=True)}
    sums[name] = np.array([np.nan if by_subject.get(s) is None else by_subject[s]
                           for s in subject_ids], np.float64)
  return [metrics.paired(row, sums[row], ref, sums[ref], seed=seed)
          for row, ref in verdict_rows(list(sums))]


def headline(verdicts: Sequence[metrics.Paired]) -> str:
  """One plain sentence per aligned method: did aligning help, against the same model
  unaligned (pas: few_shot, the same context at alpha 0; dpo: zero_shot, its base model)?"""
  lines = []
  for v in verdicts:
    if (v.row, v.reference) in (("pas", "few_shot"), ("dpo", "zero_shot")):
      reading = ("lower error than" if v.ci_high < 0 else "higher error than" if v.ci_low > 0
                 else "no clear difference from")
      lines.append(f"Aligning with {v.row} helped {v.wins} of {v.n_subjects} subjects "
                   f"(hurt {v.losses}, {v.ties} unchanged); mean change in composite error "
                   f"{v.mean:+.3f} (95% CI {v.ci_low:+.3f} to {v.ci_high:+.3f}): {reading} "
                   f"the same model unaligned ({v.reference}).")
  return "\n".join(lines)
