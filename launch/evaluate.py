"""The main job: the PAPI benchmark for every method, side by side, resumable.

    python -m launch.evaluate --subjects=0:4 --output_dir=runs/quickstart
    python -m launch.evaluate --config=configs/default.py --config.pas.folds=5 --model=/path/hf

Each (subject, method) record is appended to OUTPUT_DIR/records.jsonl as soon as it is
computed; a rerun with the same --output_dir skips what is done. At the end: results.json,
results.md (table with bootstrap CIs) and PNG plots, all computed from the records.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import os
import pathlib
import sys
import time

from tqdm import tqdm

from palign_jax import data, prompts, scoring, store
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods as methods_lib
from palign_jax.evaluation import metrics, plots, report
from palign_jax.protocol import alignment as alignment_lib

_CONFIG = common.config_flag()
_MODEL = common.shorthand_flag("model", common.MODEL_HELP)
_SUBJECTS = common.shorthand_flag("subjects", common.SUBJECTS_HELP)
_METHODS = common.shorthand_flag(
    "methods", "comma-separated rows of the table. LLM: "
    f"{', '.join(methods_lib.MODEL_METHODS)}; non-LLM baselines: "
    f"{', '.join(methods_lib.baselines.BASELINE_METHODS)}.")
_OUTPUT_DIR = common.output_dir_flag()


def _parse_methods(spec: str) -> list[str]:
  chosen = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in chosen if m not in methods_lib.ALL_METHODS]
  if unknown or not chosen:
    raise UserInputError(f"--methods: unknown method(s) {unknown or spec!r}; known: "
                         f"{', '.join(methods_lib.ALL_METHODS)}")
  return chosen


def identity_of(config, engine=None) -> dict:
  """What makes records comparable: prompts, seed, PAS and probe settings, the model."""
  identity = {"prompt_version": prompts.PROMPT_VERSION, "seed": int(config.seed),
              "pas": {k: v for k, v in config.pas.to_dict().items()
                      if k not in ("selection", "decoding")},
              "probe": config.probe.to_dict(), "readout": config.readout.to_dict(),
              "selection": config.selection.to_dict()}
  identity["pas"]["alphas"] = [float(a) for a in identity["pas"]["alphas"]]
  if "dpo" in _parse_methods(config.methods):  # only then: other runs' directories still match
    identity["dpo"] = config.dpo.to_dict()
  if engine is not None:
    identity["model"] = {"fingerprint": engine.fingerprint, "source": engine.source,
                         "dtype": config.dtype}
  return identity


def run(config, output_dir: str) -> dict:
  """Runs the evaluation described by `config` into `output_dir`; returns results.json.

  With several processes (`config.distributed`), each runs its share of the subjects into its
  own records shard, and each writes the report from every shard found when it finishes (the
  last to finish writes the complete one; a report made while a share is missing says so).
  """
  process, processes = common.init_distributed(config)
  methods = _parse_methods(config.methods)
  if "dpo" in methods:
    common.refuse_in_pod(config, processes, "--methods=dpo")
  subjects = data.parse_subject_spec(str(config.subjects), data.load_papi_subjects())
  llm_methods = [m for m in methods if m in methods_lib.MODEL_METHODS]
  if "pas_oracle_test" in llm_methods:
    heldout = data.load_split().heldout
    blank = [s for s, row in zip(subjects.ids, subjects.answers[:, heldout], strict=True)
             if not (row > 0).any()]
    if blank:
      raise UserInputError(f"--methods: pas_oracle_test chooses alpha on the held-out answers, "
                           f"which subjects {blank[:5]} do not have; leave it out")
  engine = settings = dpo_settings = None
  if llm_methods:
    from palign_jax import engine as engine_lib  # imports JAX; baselines-only runs skip it
    engine = engine_lib.Engine.from_config(config)
    if any(m in ("pas", "pas_oracle_test") for m in llm_methods):
      settings = alignment_lib.AlignSettings.for_engine(  # the alpha grid
          config, engine, progress=lambda label: print(label, file=sys.stderr))
    else:
      settings = alignment_lib.AlignSettings.from_config(
          config, engine.config.num_layers * engine.config.num_heads)
    dpo_settings = methods_lib.dpo_settings_for(config, llm_methods)
  identity = identity_of(config, engine)
  common.check_same_run(identity, process, processes)
  share_ids, records_file, writes = common.work_of_process(config, subjects.ids, process,
                                                           processes)
  results_store = store.ResultStore(output_dir, identity, records_file, writes=writes)
  common.sync_processes(config, processes, "records opened")
  timing_start = time.perf_counter()
  share = subjects.select(share_ids)

  baseline_methods = [m for m in methods if m not in methods_lib.MODEL_METHODS]
  todo = [m for m in baseline_methods if not all(results_store.has(s, m) for s in share.ids)]
  for record in methods_lib.baseline_records(share, todo, int(config.seed)):
    if not results_store.has(record["subject"], record["method"]):
      results_store.append(record)

  pending = [s for s in share.ids
             if any(not results_store.has(s, m) for m in llm_methods)]
  if pending:
    zero_shot_cache: dict = {}
    batch = max(1, int(config.subjects_per_batch))
    bar = tqdm(total=len(pending), unit="subject", file=sys.stderr,
               desc="subjects" if processes == 1 else f"process {process}/{processes}")
    if any(m in methods_lib.SWEEP_METHODS for m in llm_methods):
      bar.set_postfix_str("shared activations (once per model)")
      engine.activations()
    for start in range(0, len(pending), batch):
      chunk = subjects.select(pending[start:start + batch])
      # A batch runs the methods any of its subjects still needs; finished pairs are skipped.
      needed = [m for m in llm_methods if any(not results_store.has(s, m) for s in chunk.ids)]
      for record in methods_lib.llm_records(engine, chunk, needed, settings,
                                            zero_shot_cache=zero_shot_cache,
                                            progress=bar.set_postfix_str,
                                            dpo_settings=dpo_settings):
        if not results_store.has(record["subject"], record["method"]):
          results_store.append(record)  # at once: a kill never loses a finished record
      bar.update(len(chunk))
    bar.close()
  results_store.refresh()  # the other processes' finished records
  run_info = {"wall_time_s": time.perf_counter() - timing_start, "processes": processes,
              "mode": common.distributed_mode(config) if processes > 1 else "one process"}
  if engine is not None:
    run_info.update(activations=engine.activation_stats,
                    compiled_programs=scoring.compiled_programs(),
                    alphas=list(settings.alphas), alpha_range=settings.alpha_range)
  if not writes:  # pod mode: process 0 writes the records and the report
    return {}
  return write_reports(results_store, methods, subjects, config, output_dir, run_info)


def write_reports(results_store: store.ResultStore, methods: list[str], subjects: data.Subjects,
                  config, output_dir: str, run_info: dict) -> dict:
  """results.json, results.md and plots, all computed from the stored records."""
  out = pathlib.Path(output_dir)
  summaries, extras = methods_lib.summaries_from_records(
      results_store.records(), methods, subjects.ids, seed=int(config.seed))
  notes = {name: methods_lib.row_note(name, extras[name]) for name in summaries}
  verdicts = methods_lib.paired_verdicts(results_store.records(), methods, subjects.ids,
                                         seed=int(config.seed))
  headline = methods_lib.headline(verdicts)
  missing = sorted({s for s in subjects.ids for m in methods if not results_store.has(s, m)})
  results = {
      "model": results_store.identity.get("model"),
      "prompt_version": prompts.PROMPT_VERSION,
      "subjects": list(subjects.ids),
      "subjects_missing": missing,
      "methods": {name: dict(s.as_dict(), **extras[name]) for name, s in summaries.items()},
      "notes": notes,
      "verdicts": [v.as_dict() for v in verdicts],
      "headline": headline,
      "run": run_info,
  }
  store.write_json(out / "results.json", results)
  table = report.markdown_table(summaries, notes=notes, extras=extras)
  gap = (f" ({len(missing)} not finished yet: {', '.join(missing[:10])}; rerun to complete)"
         if missing else "")
  markdown = store.atomic_path(out / "results.md")
  verdict_text = ""
  if verdicts:
    verdict_text = (
        "\n\n## Paired verdicts\n\nPer subject, the row's composite error minus the "
        "reference's (negative: closer to the person); better / tied / worse counts subjects; "
        "95% CI by a paired bootstrap over subjects. pas is compared with few_shot, the same "
        "context at alpha 0 read with the same readout, so the difference is the steering "
        f"alone.\n\n{report.verdict_table(verdicts)}\n")
  markdown.write_text(
      f"# PAPI evaluation\n\nModel: {report.model_line(results['model'])}\n"
      f"Subjects: {len(subjects)}{gap}\n\n{headline + chr(10) * 2 if headline else ''}"
      "Mean absolute error on the held-out items (lower is better); 95% bootstrap CI over "
      "subjects; missing answers = held-out items the subjects left blank (not scored); letter "
      "mass = probability the model gave to the five option letters before renormalisation "
      "(mean over items and subjects / lowest item); s / subject = wall seconds of the work "
      f"that produced the row.\n\n{table}\n{verdict_text}")
  os.replace(markdown, out / "results.md")
  if config.plots and summaries:
    for name, draw in (
        ("errors_by_trait.png", lambda path: plots.plot_errors(
            {row: s for row, s in summaries.items() if _plotted(row)}, path)),
        ("profile_first_subject.png", lambda path: _plot_first_profile(
            results_store, methods, subjects, path)),
        ("paired_verdicts.png", lambda path: verdicts and plots.plot_verdicts(verdicts, path))):
      tmp = store.atomic_path(out / name)
      draw(tmp)
      if tmp.stat().st_size:
        os.replace(tmp, out / name)
      else:
        tmp.unlink()
  return results


def _plotted(row: str) -> bool:
  """The plot shows each method's headline row, every readout of pas, and the baselines (the
  table has every row)."""
  return "[" not in row or row.startswith("pas [")


def _plot_first_profile(results_store, methods, subjects, path) -> None:
  heldout = data.load_split().heldout
  sid, answers = subjects.ids[0], subjects.answers[0]
  if not (answers[heldout] > 0).any():
    return  # no held-out answers (a user's own file): nothing to compare with
  profiles = {"person": plots.trait_scores(answers[heldout], heldout)}
  for method in methods:
    record = results_store.get(sid, method)
    if record:
      first = next(iter(record["decodings"].values()))
      profiles[method] = plots.trait_scores(first["predictions"], heldout)
  plots.plot_profile(sid, profiles, path)


def summary_text(results: dict, config) -> str:
  """What the main command prints: the model, the plain verdict, one row per method."""
  summaries = {row: metrics.Summary(**{k: m[k] for k in (
      "mean", "ci_low", "ci_high", "n_subjects", "n_unparsable", "n_missing_answers")})
      for row, m in results["methods"].items()}
  verdicts = [metrics.Paired(**dict(v, differences=tuple(v["differences"])))
              for v in results["verdicts"]]
  missing = results["subjects_missing"]
  lines = [f"Model: {report.model_line(results['model'])}",
           f"Subjects: {len(results['subjects'])}"
           + (f" ({len(missing)} not finished yet; rerun to complete)" if missing else "")]
  run_info = results.get("run", {})
  if run_info.get("alphas") is not None:
    lines.append(f"Alphas: {run_info['alphas']} ({config.pas.alpha_grid} grid)")
  if results.get("headline"):
    lines += ["", results["headline"]]
  lines += ["", "Composite error on the held-out items (sum of the five trait errors, lower is "
            "better), each method's headline readout:", "",
            report.headline_table(summaries, results["methods"], verdicts), "",
            "Per-readout rows, per-trait errors and every paired verdict: results.md"]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  config = common.resolved_config(_CONFIG, model=_MODEL.value, subjects=_SUBJECTS.value,
                                  methods=_METHODS.value)
  output_dir = common.output_dir("evaluate")
  results = run(config, output_dir)
  out = pathlib.Path(output_dir)
  if not results:
    print(f"Pod mode: process 0 wrote the records and the report in {out}")
    return
  print(summary_text(results, config))
  pictures = ", ".join(str(p) for p in sorted(out.glob("*.png")))
  print(f"Results: {out / 'results.json'}; table: {out / 'results.md'}"
        + (f"; plots: {pictures}" if pictures else ""))


if __name__ == "__main__":
  common.run(main)
