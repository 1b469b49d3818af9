"""The main job: the PAPI benchmark for every method, side by side, resumable.

    python -m launch.evaluate --subjects=0:4 --output_dir=runs/quickstart
    python -m launch.evaluate --config=configs/default.py --config.pas.folds=5 --model=/path/hf

Per-subject records are appended to OUTPUT_DIR/records.jsonl as each batch of
subjects finishes; a rerun with the same --output_dir skips what is done. At the
end: results.json, results.md (table with bootstrap CIs) and PNG plots.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import pathlib
import sys
import time

from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from palign_jax import data, prompts
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods as methods_lib
from palign_jax.evaluation import plots, report, store
from palign_jax.pas import search

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py"),
    "Run configuration (a configs/*.py file); override fields with --config.FIELD=VALUE, e.g. "
    "--config.pas.top_k=48 --config.pas.alphas='(0,2,4)'.")
_MODEL = flags.DEFINE_string(
    "model", None, "Model to evaluate: 'default' (the embedded SmolLM2-135M-Instruct GGUF), a "
    ".gguf file, or a local Hugging Face folder (config.json + safetensors). Overrides "
    "config.model.")
_SUBJECTS = flags.DEFINE_string(
    "subjects", None, "Subjects: 'all' (the 300 PAPI subjects), comma-separated ids, 0-based "
    "ranges like '0:8', or a CSV/JSON answers file (see examples/my_answers.csv). Overrides "
    "config.subjects.")
_METHODS = flags.DEFINE_string(
    "methods", None, "Comma-separated methods (overrides config.methods). LLM: "
    f"{', '.join(methods_lib.LLM_METHODS)}; non-LLM baselines: "
    f"{', '.join(methods_lib.baselines.BASELINE_METHODS)}.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "runs/evaluate", "Directory for records.jsonl, results.json, results.md and "
    "plots. Rerunning with the same directory resumes; a directory made by another model or "
    "configuration is refused.")
_SEED = flags.DEFINE_integer("seed", None, "Seed for probe splits, folds and the bootstrap "
                             "(overrides config.seed).")


def _resolved_config():
  config = _CONFIG.value
  with config.unlocked():
    for flag, field in ((_MODEL, "model"), (_SUBJECTS, "subjects"), (_METHODS, "methods"),
                        (_SEED, "seed")):
      if flag.value is not None:
        config[field] = flag.value
  return config


def _parse_methods(spec: str) -> list[str]:
  chosen = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in chosen if m not in methods_lib.ALL_METHODS]
  if unknown or not chosen:
    raise UserInputError(f"--methods: unknown method(s) {unknown or spec!r}; known: "
                         f"{', '.join(methods_lib.ALL_METHODS)}")
  return chosen


def pas_settings(config) -> search.PasSettings:
  return search.PasSettings(top_k=float(config.pas.top_k), alphas=tuple(config.pas.alphas),
                            folds=int(config.pas.folds), seed=int(config.seed))


def run(config, output_dir: str) -> dict:
  """Runs the evaluation described by `config` into `output_dir`; returns results.json."""
  methods = _parse_methods(config.methods)
  subjects = data.parse_subject_spec(str(config.subjects), data.load_papi_subjects())
  settings = pas_settings(config)
  llm_methods = [m for m in methods if m in methods_lib.LLM_METHODS]
  engine = None
  identity = {"prompt_version": prompts.PROMPT_VERSION, "seed": int(config.seed),
              "pas": {"top_k": settings.top_k, "alphas": list(settings.alphas),
                      "folds": settings.folds}}
  if llm_methods:
    from palign_jax import engine as engine_lib  # imports JAX; baselines-only runs skip it
    engine = engine_lib.Engine.load(config.model, dtype=config.dtype,
                                    question_batch=int(config.scoring.question_batch))
    identity["model"] = {"fingerprint": engine.fingerprint, "source": engine.source,
                         "dtype": config.dtype}
  results_store = store.ResultStore(output_dir, identity)
  timing_start = time.perf_counter()

  baseline_methods = [m for m in methods if m not in methods_lib.LLM_METHODS]
  todo = [m for m in baseline_methods if not all(results_store.has(s, m) for s in subjects.ids)]
  for record in methods_lib.baseline_records(subjects, todo, int(config.seed)):
    if not results_store.has(record["subject"], record["method"]):
      results_store.append(record)

  pending = [s for s in subjects.ids
             if any(not results_store.has(s, m) for m in llm_methods)]
  if pending:
    zero_shot_cache: dict = {}
    batch = max(1, int(config.subjects_per_batch))
    bar = tqdm(total=len(pending), desc="subjects", unit="subject", file=sys.stderr)
    for start in range(0, len(pending), batch):
      chunk = subjects.select(pending[start:start + batch])
      # A batch runs the methods any of its subjects still needs; finished pairs are skipped.
      needed = [m for m in llm_methods if any(not results_store.has(s, m) for s in chunk.ids)]
      records = methods_lib.llm_records(
          engine.score, engine.activations, chunk, needed, settings,
          zero_shot_cache=zero_shot_cache, progress=lambda stage: bar.set_postfix_str(stage))
      for record in records:
        if not results_store.has(record["subject"], record["method"]):
          results_store.append(record)
      bar.update(len(chunk))
    bar.close()
  return write_reports(results_store, methods, subjects, config, output_dir,
                       time.perf_counter() - timing_start)


def write_reports(results_store: store.ResultStore, methods: list[str], subjects: data.Subjects,
                  config, output_dir: str, seconds: float) -> dict:
  """results.json, results.md and plots, all computed from the stored records."""
  out = pathlib.Path(output_dir)
  summaries, wall = methods_lib.summaries_from_records(
      results_store.records(), methods, subjects.ids, seed=int(config.seed))
  notes = {name: methods_lib.METHOD_NOTES.get(name.split(" ")[0], "") for name in summaries}
  results = {
      "model": results_store.identity.get("model"),
      "prompt_version": prompts.PROMPT_VERSION,
      "subjects": list(subjects.ids),
      "methods": {name: s.as_dict() for name, s in summaries.items()},
      "wall_time_s_per_subject": wall,
      "notes": notes,
  }
  store.write_json(out / "results.json", results)
  table = report.markdown_table(summaries, notes=notes, wall_time_s=wall)
  (out / "results.md").write_text(
      f"# PAPI evaluation\n\nModel: {results['model']}\nSubjects: {len(subjects)}\n"
      f"Mean absolute error on the 180 held-out items (lower is better); 95% bootstrap CI "
      f"over subjects; time = wall seconds per subject.\n\n{table}\n")
  if config.plots and summaries:
    plots.plot_errors(summaries, out / "errors_by_trait.png")
    _plot_first_profile(results_store, methods, subjects, out / "profile_first_subject.png")
  return results


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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  config = _resolved_config()
  results = run(config, _OUTPUT_DIR.value)
  out = pathlib.Path(_OUTPUT_DIR.value)
  print((out / "results.md").read_text())
  print(f"Results: {out / 'results.json'}; table: {out / 'results.md'}; plots: "
        f"{', '.join(str(p) for p in sorted(out.glob('*.png')))}")
  del results


if __name__ == "__main__":
  common.run(main)


