"""Aligns a model to subjects with PAS and saves one alignment profile per subject.

    python -m launch.align --subjects=0:4 --output_dir=runs/align
    python -m launch.align --subjects=examples/my_answers.csv --output_dir=runs/me

Writes, as each batch of subjects finishes: OUTPUT_DIR/profiles/<subject>/ (an
orbax checkpoint: heads, directions, sigma, chosen alpha, context, model
fingerprint) and a line in OUTPUT_DIR/records.jsonl (kept heads, alpha,
per-trait errors when the subject's held-out answers are known). Reruns skip
finished subjects. Use a profile with `python -m launch.chat --profile=...`.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import pathlib
import sys

import numpy as np
from absl import flags
from tqdm import tqdm

from palign_jax import data, prompts
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods as methods_lib
from palign_jax.evaluation import store
from palign_jax.pas import profile as profile_lib
from palign_jax.pas import search

ALPHA_SELECTIONS = ("kfold_known", "oracle_test")

_MODEL = flags.DEFINE_string("model", "default", "'default' (embedded SmolLM2-135M-Instruct "
                             "GGUF), a .gguf file, or a local Hugging Face folder.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_SUBJECTS = flags.DEFINE_string(
    "subjects", "0:2", "PAPI subjects ('all', ids, 0-based ranges like '0:8') or a CSV/JSON "
    "answers file with at least the 120 short-form items (see examples/my_answers.csv).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/align", "Where profiles/ and "
                                  "records.jsonl go; rerunning resumes.")
_ALPHA_SELECTION = flags.DEFINE_enum(
    "alpha_selection", "kfold_known", ALPHA_SELECTIONS,
    "kfold_known (default, honest): alpha chosen by k-fold over the subject's 120 known items. "
    "oracle_test: the reference's protocol, alpha chosen by the error on the 180 held-out TEST "
    "items (optimistic; needs the held-out answers; labelled in every output).")
_DECODING = flags.DEFINE_enum("decoding", "argmax", list(search.DECODINGS),
                              "Answer decoding used to choose alpha: argmax (most likely "
                              "letter, the paper's) or median (of the letter distribution).")
_TOP_K = flags.DEFINE_float("top_k", 24, "Heads kept: a count, or a fraction of all heads if < 1.")
_ALPHAS = flags.DEFINE_list("alphas", ["0", "1", "2", "4", "6", "8"], "Candidate alphas.")
_FOLDS = flags.DEFINE_integer("folds", 3, "k of the honest k-fold alpha selection.")
_BATCH = flags.DEFINE_integer("subjects_per_batch", 4, "Subjects aligned together.")
_QUESTION_BATCH = flags.DEFINE_integer("question_batch", 20, "Questions scored together.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the probe splits and folds.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  try:
    alphas = tuple(float(a) for a in _ALPHAS.value)
  except ValueError:
    raise UserInputError(f"--alphas: {_ALPHAS.value} are not all numbers") from None
  settings = search.PasSettings(top_k=_TOP_K.value, alphas=alphas, folds=_FOLDS.value,
                                seed=_SEED.value)
  subjects = data.parse_subject_spec(_SUBJECTS.value, data.load_papi_subjects())
  heldout = data.load_split().heldout
  has_test = (subjects.answers[:, heldout] > 0).any(axis=1)
  oracle = _ALPHA_SELECTION.value == "oracle_test"
  if oracle and not has_test.all():
    missing = [s for s, ok in zip(subjects.ids, has_test, strict=True) if not ok]
    raise UserInputError(f"--alpha_selection=oracle_test needs held-out answers, which subjects "
                         f"{missing[:5]} do not have; use kfold_known")

  from palign_jax import engine as engine_lib
  engine = engine_lib.Engine.load(_MODEL.value, dtype=_DTYPE.value,
                                  question_batch=_QUESTION_BATCH.value)
  out = pathlib.Path(_OUTPUT_DIR.value)
  results_store = store.ResultStore(out, {
      "model": {"fingerprint": engine.fingerprint, "source": engine.source,
                "dtype": _DTYPE.value},
      "prompt_version": prompts.PROMPT_VERSION, "alpha_selection": _ALPHA_SELECTION.value,
      "decoding": _DECODING.value, "pas": {"top_k": settings.top_k, "alphas": list(alphas),
                                           "folds": settings.folds}, "seed": settings.seed})
  method = "pas_oracle_test" if oracle else "pas"
  pending = [s for s in subjects.ids if not results_store.has(s, method)]
  bar = tqdm(total=len(pending), desc="aligning", unit="subject", file=sys.stderr)
  for start in range(0, len(pending), max(1, _BATCH.value)):
    chunk = subjects.select(pending[start:start + _BATCH.value])
    known = data.known_answers(chunk).astype(np.int64)
    sweep = search.run_sweep(engine.score, engine.activations(), known, settings,
                             subject_ids=chunk.ids, with_selection=not oracle,
                             heldout=heldout if has_test.any() else heldout[:0],
                             progress=bar.set_postfix_str)
    records = methods_lib.sweep_records(sweep, chunk, [method], settings, seconds_per_subject=0)
    for s, (sid, record) in enumerate(zip(chunk.ids, records, strict=True)):
      alpha = record["alpha"][_DECODING.value]
      fitted = profile_lib.AlignmentProfile(
          subject_id=sid, model_fingerprint=engine.fingerprint, model_source=engine.source,
          prompt_version=prompts.PROMPT_VERSION,
          system_prompt=prompts.few_shot_system_prompt(known[s]), alpha=alpha,
          alpha_selection=record["alpha_selection"], known_answers=known[s],
          head_mask=np.asarray(sweep.fit.head_mask[s]),
          directions=np.asarray(sweep.fit.directions[s]), sigma=np.asarray(sweep.fit.sigma[s]),
          settings={"top_k": settings.top_k, "alphas": list(alphas), "folds": settings.folds,
                    "decoding": _DECODING.value, "seed": settings.seed})
      path = profile_lib.save_profile(out / "profiles" / _safe(sid), fitted)
      layers, heads = np.nonzero(fitted.head_mask)
      record.update(profile=str(path), heads=[[int(a), int(b)] for a, b in
                                              zip(layers, heads, strict=True)],
                    sigma=[float(fitted.sigma[a, b]) for a, b in zip(layers, heads, strict=True)],
                    has_test_answers=bool(has_test[subjects.ids.index(sid)]))
      results_store.append(record)
    bar.update(len(chunk))
  bar.close()
  for sid in subjects.ids:
    record = results_store.get(sid, method)
    errors = record["decodings"][_DECODING.value]["sum"] if record["has_test_answers"] else None
    print(f"subject {sid}: alpha={record['alpha'][_DECODING.value]} ({record['alpha_selection']})"
          f", {len(record['heads'])} heads" + (f", held-out error sum {errors:.3f}"
                                               if errors is not None else "")
          + f", profile {record['profile']}")


def _safe(subject_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in subject_id)


if __name__ == "__main__":
  common.run(main)
