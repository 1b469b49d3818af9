"""Aligns a model to subjects with PAS (or DPO) and saves one alignment profile per subject.

    python -m launch.align --subjects=0:4 --output_dir=runs/align
    python -m launch.align --subjects=examples/my_answers.csv --output_dir=runs/me
    python -m launch.align --subjects=0:4 --config.pas.selection=oracle_test   # the paper's
    python -m launch.align --subjects=0:4 --align_method=dpo --output_dir=runs/align_dpo

Runs the same protocol as `launch.evaluate` (`palign_jax.protocol.alignment`) with the same
config, so the same subjects get the same alphas and predictions. Writes, as each batch of
subjects finishes: OUTPUT_DIR/profiles/<subject>/ (an orbax checkpoint: heads, directions,
sigma, chosen alpha, context, model fingerprint) and a line in OUTPUT_DIR/records.jsonl (kept
heads, alpha, per-trait errors when the subject's held-out answers are known). Reruns skip
finished subjects. Use a profile with `python -m launch.chat --profile=...`.

`--align_method=dpo` (`config.align_method`) trains the DPO baseline instead
(`palign_jax.protocol.dpo`, settings `config.dpo`, as `launch.evaluate --methods=dpo` runs it):
each profile holds the subject's LoRA adapter at the number of steps chosen by k-fold on the
known items, under the default system prompt; its record is the dpo record. The readout is
chosen with the steps (`config.readout.choice`); `config.pas.selection` and
`config.pas.decoding` are PAS settings and must stay at their defaults. A directory holds one
method's profiles: a DPO run in a PAS directory (or the reverse) is refused.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import pathlib
import sys

import numpy as np
from tqdm import tqdm

from palign_jax import data, parallel, prompts, readout, store
from palign_jax.errors import UserInputError
from palign_jax.protocol import alignment as alignment_lib
from palign_jax.protocol import dpo as dpo_lib
from palign_jax.protocol import profile as profile_lib
from palign_jax.protocol import records as records_lib

_CONFIG = common.config_flag()
_MODEL = common.shorthand_flag("model", common.MODEL_HELP)
_SUBJECTS = common.shorthand_flag("subjects", common.SUBJECTS_HELP)
_OUTPUT_DIR = common.output_dir_flag()
_ALIGN_METHOD = common.shorthand_flag(
    "align_method", "'pas' (steering, the default) or 'dpo' (a LoRA adapter per subject trained "
    "by DPO on the known answers, config.dpo; much slower).")

METHOD_OF = {"kfold_known": "pas", "oracle_test": "pas_oracle_test"}
ALIGN_METHODS = ("pas", "dpo")


def _safe(subject_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in subject_id)


def run(config, output_dir: str) -> store.ResultStore:
  """Aligns the config's subjects into `output_dir`; returns the result store.

  With several processes (`config.distributed`), each aligns its share of the subjects and
  appends to its own records shard.
  """
  process, processes = common.init_distributed(config)
  if str(config.align_method) == "dpo":
    return run_dpo(config, output_dir, process, processes)
  if str(config.align_method) not in ALIGN_METHODS:
    raise UserInputError(f"--align_method: {config.align_method!r} is not one of "
                         f"{list(ALIGN_METHODS)}")
  selection, decoding = str(config.pas.selection), str(config.pas.decoding)
  if selection not in METHOD_OF:
    raise UserInputError(f"--config.pas.selection: {selection!r} is not one of "
                         f"{sorted(METHOD_OF)}")
  if decoding != "chosen" and decoding not in readout.DECODINGS:
    raise UserInputError(f"--config.pas.decoding: {decoding!r} is neither 'chosen' nor one of "
                         f"{list(readout.DECODINGS)}")
  subjects = data.parse_subject_spec(str(config.subjects), data.load_papi_subjects())
  heldout = data.load_split().heldout
  has_test = (subjects.answers[:, heldout] > 0).any(axis=1)

  from palign_jax import engine as engine_lib
  engine = engine_lib.Engine.from_config(config)
  settings = alignment_lib.AlignSettings.for_engine(  # the alpha grid too
      config, engine, progress=lambda label: print(label, file=sys.stderr))
  if decoding != "chosen" and decoding not in settings.decodings:
    raise UserInputError(f"--config.pas.decoding: {decoding!r} is not among "
                         f"--config.readout.decodings ({', '.join(settings.decodings)})")
  out = pathlib.Path(output_dir)
  identity = {
      "model": {"fingerprint": engine.fingerprint, "source": engine.source,
                "dtype": config.dtype},
      "prompt_version": prompts.PROMPT_VERSION, "seed": int(config.seed),
      "pas": {k: ([float(a) for a in v] if k == "alphas" else v)
              for k, v in config.pas.to_dict().items()},
      "probe": config.probe.to_dict(), "readout": config.readout.to_dict(),
      "selection": config.selection.to_dict()}
  common.check_same_run(identity, process, processes)
  share, records_file, writes = common.work_of_process(config, subjects.ids, process, processes)
  results_store = store.ResultStore(out, identity, records_file, writes=writes)
  common.sync_processes(config, processes, "records opened")
  method = METHOD_OF[selection]
  pending = [s for s in share if not results_store.has(s, method)]
  bar = tqdm(total=len(pending), unit="subject", file=sys.stderr,
             desc="aligning" if processes == 1 else f"aligning, process {process}/{processes}")
  if pending:
    bar.set_postfix_str("shared activations (once per model)")
    engine.activations()
  batch = max(1, int(config.subjects_per_batch))
  for start in range(0, len(pending), batch):
    chunk = subjects.select(pending[start:start + batch])
    known = data.known_answers(chunk).astype(np.int64)
    alignments = alignment_lib.align_subjects(
        engine, engine.activations(), chunk, settings, selections=(selection,),
        heldout=heldout if has_test.any() else heldout[:0], progress=bar.set_postfix_str)
    for s, alignment in enumerate(alignments):
      # "chosen": the subject's own readout, picked with alpha on the known items (k-fold).
      used = (alignment.chosen_decoding.get("pas", readout.DECODINGS[0])
              if decoding == "chosen" else decoding)
      profile = profile_lib.profile_from_alignment(
          alignment, model_fingerprint=engine.fingerprint, model_source=engine.source,
          known_answers=known[s], selection=selection, decoding=used,
          settings={"pas": config.pas.to_dict(), "probe": config.probe.to_dict(),
                    "seed": int(config.seed)})
      path = out / "profiles" / _safe(alignment.subject_id)
      if writes:  # pod mode: every process has the profile, process 0 saves it
        path = profile_lib.save_profile(path, profile)
      layers, heads = np.nonzero(profile.head_mask)
      seconds = sum(alignment.work["stage_seconds"].values()) / len(chunk)
      (record,) = records_lib.pas_records(
          alignment, chunk.answers[s], [method], profile=str(path), decoding=used,
          heads=[[int(a), int(b)] for a, b in zip(layers, heads, strict=True)],
          sigma=[float(profile.sigma[a, b]) for a, b in zip(layers, heads, strict=True)],
          has_test_answers=bool(has_test[subjects.ids.index(alignment.subject_id)]),
          seconds_per_subject=seconds)
      results_store.append(record)
    bar.update(len(chunk))
  bar.close()
  results_store.refresh()
  return results_store


def run_dpo(config, output_dir: str, process: int, processes: int) -> store.ResultStore:
  common.refuse_in_pod(config, processes, "--align_method=dpo")
  """`run` for `config.align_method == "dpo"`: one DPO adapter per subject, its profile and
  its dpo record."""
  if str(config.pas.selection) != "kfold_known" or str(config.pas.decoding) != "chosen":
    raise UserInputError("--align_method=dpo chooses the number of steps by k-fold on the known "
                         "items, with the readout (config.readout.choice); leave "
                         "--config.pas.selection and --config.pas.decoding at their defaults")
  settings = dpo_lib.DpoSettings.from_config(config)  # checked before the model loads
  subjects = data.parse_subject_spec(str(config.subjects), data.load_papi_subjects())
  heldout = data.load_split().heldout
  has_test = (subjects.answers[:, heldout] > 0).any(axis=1)

  from palign_jax import engine as engine_lib
  engine = engine_lib.Engine.from_config(config)
  out = pathlib.Path(output_dir)
  identity = {
      "model": {"fingerprint": engine.fingerprint, "source": engine.source,
                "dtype": config.dtype},
      "prompt_version": prompts.PROMPT_VERSION, "seed": int(config.seed), "align_method": "dpo",
      "dpo": config.dpo.to_dict(), "folds": int(config.pas.folds),
      "readout": config.readout.to_dict()}
  common.check_same_run(identity, process, processes)
  results_store = store.ResultStore(out, identity, store.shard_file(process, processes))
  share = parallel.subjects_of_process(subjects.ids, process, processes)
  pending = [s for s in share if not results_store.has(s, "dpo")]
  bar = tqdm(total=len(pending), unit="subject", file=sys.stderr,
             desc="aligning (DPO)" if processes == 1 else
             f"aligning (DPO), process {process}/{processes}")
  batch = max(1, int(config.subjects_per_batch))
  for start in range(0, len(pending), batch):
    chunk = subjects.select(pending[start:start + batch])
    results = dpo_lib.align_subjects(engine, chunk, settings,
                                     heldout=heldout if has_test.any() else heldout[:0],
                                     progress=bar.set_postfix_str)
    for s, result in enumerate(results):
      profile = profile_lib.profile_from_dpo(
          result, model_fingerprint=engine.fingerprint, model_source=engine.source,
          settings={"dpo": config.dpo.to_dict(), "folds": int(config.pas.folds),
                    "seed": int(config.seed)})
      path = profile_lib.save_profile(out / "profiles" / _safe(result.subject_id), profile)
      seconds = sum(result.work["stage_seconds"].values()) / len(chunk)
      results_store.append(records_lib.dpo_record(
          result, chunk.answers[s], profile=str(path), decoding=result.chosen_decoding,
          has_test_answers=bool(has_test[subjects.ids.index(result.subject_id)]),
          seconds_per_subject=seconds))
    bar.update(len(chunk))
  bar.close()
  results_store.refresh()
  return results_store


def summary_line(record: dict) -> str:
  """What `main` prints for one aligned subject."""
  sid, used = record["subject"], record["decoding"]
  error = record["decodings"][used]["sum"] if record["has_test_answers"] else None
  if record["method"] == "dpo":
    line = (f"subject {sid}: dpo steps={record['chosen_steps']} (learning rate "
            f"{record['chosen_learning_rate']}, {record['step_selection']}, readout {used}), "
            f"{record['num_pairs']} preference pairs")
  else:
    line = (f"subject {sid}: alpha={record['alpha'][used]} ({record['alpha_selection']}, "
            f"readout {used}), {len(record['heads'])} heads")
  return (line + (f", held-out error sum {error:.3f}" if error is not None else "")
          + f", profile {record['profile']}" + (f"; note: {record['note']}"
                                                 if record.get("note") else ""))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  config = common.resolved_config(_CONFIG, model=_MODEL.value, subjects=_SUBJECTS.value,
                                  align_method=_ALIGN_METHOD.value)
  results_store = run(config, common.output_dir("align"))
  method = ("dpo" if str(config.align_method) == "dpo"
            else METHOD_OF[str(config.pas.selection)])
  subjects = data.parse_subject_spec(str(config.subjects), data.load_papi_subjects())
  for sid in subjects.ids:
    record = results_store.get(sid, method)
    if record is None:
      print(f"subject {sid}: not aligned yet (another process's share; rerun to complete)")
      continue
    print(summary_line(record))


if __name__ == "__main__":
  common.run(main)
