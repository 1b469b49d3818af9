"""Administers any questionnaire to many alignment profiles at once.

    python -m launch.answer --questionnaire=examples/weekend_habits.csv --profiles=runs/me
    python -m launch.answer --questionnaire=q.csv --profiles='runs/*/profiles/*' --output_dir=o

The questionnaire is a CSV (`item`, `statement`, optional `trait` and `keyed` +/-; the answer
scale is PAPI's five options unless the file has `# option: key, value, label` lines or
--config.answer.scale names a `key,value,label` CSV; `palign_jax/questionnaire.py`). Profiles
(PAS and DPO mixed) must all come from the loaded model (checked by fingerprint). Every
profile's context is encoded once under its steering or adapter and every item is scored
against it, `config.answer.profiles_per_batch` profiles per scoring call (`palign_jax/
administer.py`). Writes into --output_dir (default runs/answer): records.jsonl (one line per
finished profile: a rerun, even after kill -9, skips them), answers.csv and answers.jsonl
(profile, item, probability of each option, each readout's answer), and with traits
trait_scores.csv, summary.md and trait_scores.png (the distribution over profiles, beside the
profiles' own answers when the questionnaire is IPIP-NEO's). A refused input writes nothing.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import csv
import json
import os
import pathlib
import sys

import numpy as np
from absl import flags
from tqdm import tqdm

from palign_jax import administer, data, prompts, store
from palign_jax import questionnaire as questionnaire_lib
from palign_jax.errors import UserInputError
from palign_jax.protocol import profile as profile_lib

METHOD = "answer"  # the records' method field


def _flag(define, name: str, *args):
  """A flag other launchers may define too (they can be imported into one process)."""
  return flags.FLAGS[name] if name in flags.FLAGS else define(name, *args)


_CONFIG = common.config_flag()
_MODEL = common.shorthand_flag("model", common.MODEL_HELP)
_OUTPUT_DIR = common.output_dir_flag()
_QUESTIONNAIRE = _flag(flags.DEFINE_string, "questionnaire", None,
                       "Shorthand for --config.answer.questionnaire: the questionnaire CSV "
                       "(item, statement[, trait, keyed]; see palign_jax/questionnaire.py).")
_PROFILES = _flag(flags.DEFINE_string, "profiles", None,
                  "Shorthand for --config.answer.profiles: alignment profiles, as a folder of "
                  "them (runs/me/profiles), a run folder, a quoted glob ('runs/*/profiles/*') "
                  "or a comma-separated list of profile folders.")


def check_inputs(config, engine) -> tuple:
  """Everything a run reads, checked before anything is written: `(questionnaire, prepared,
  labels, profiles, paths)`."""
  settings = config.answer
  if not settings.questionnaire:
    raise UserInputError("--questionnaire is required (a CSV: item, statement[, trait, keyed])")
  if not settings.profiles:
    raise UserInputError("--profiles is required (profile folders written by launch.align)")
  if str(settings.readout) not in questionnaire_lib.READOUTS:
    raise UserInputError(f"--config.answer.readout: {settings.readout!r} is not one of "
                         f"{questionnaire_lib.READOUTS}")
  scale = questionnaire_lib.load_scale(settings.scale) if settings.scale else None
  questionnaire = questionnaire_lib.load(settings.questionnaire, scale)
  prepared = administer.prepare(engine.model.tokenizer, questionnaire,
                                str(settings.statement_form))
  paths = profile_lib.profile_paths(str(settings.profiles))
  labels, profiles = profile_lib.load_profiles(paths, model_fingerprint=engine.fingerprint,
                                               prompt_version=prompts.PROMPT_VERSION)
  return questionnaire, prepared, labels, profiles, paths


def run(config, output_dir: str, engine=None) -> dict:
  """Scores every (profile, item) pair not yet in `output_dir`, then writes the outputs;
  returns `{"labels", "profiles", "log_probs" [profiles, items, options], "questionnaire",
  "files"}`."""
  if engine is None:
    from palign_jax import engine as engine_lib
    engine = engine_lib.Engine.from_config(config)
  questionnaire, prepared, labels, profiles, paths = check_inputs(config, engine)
  form = str(config.answer.statement_form)
  identity = {"model": {"fingerprint": engine.fingerprint, "source": engine.source,
                        "dtype": str(config.dtype)},
              "prompt_version": prompts.PROMPT_VERSION, "statement_form": form,
              "questionnaire": questionnaire.digest(form)}
  results = store.ResultStore(output_dir, identity)
  pending = [i for i, label in enumerate(labels) if not results.has(label, METHOD)]
  batch = max(1, int(config.answer.profiles_per_batch))
  with tqdm(total=len(labels), initial=len(labels) - len(pending), unit="profile",
            file=sys.stderr, desc=f"answering {len(questionnaire.items)} items") as bar:
    for start in range(0, len(pending), batch):
      chunk = pending[start:start + batch]
      log_probs = administer.score(engine, [profiles[i] for i in chunk], prepared)
      for i, rows in zip(chunk, log_probs, strict=True):
        results.append({"subject": labels[i], "method": METHOD, "profile": str(paths[i]),
                        "profile_method": profiles[i].method, "alpha": profiles[i].alpha,
                        "log_probs": rows.tolist()})
      bar.update(len(chunk))
  log_probs = np.asarray([results.get(label, METHOD)["log_probs"] for label in labels],
                         np.float32)
  files = write_outputs(pathlib.Path(output_dir), questionnaire, labels, profiles, log_probs,
                        str(config.answer.readout))
  return {"labels": labels, "profiles": profiles, "log_probs": log_probs,
          "questionnaire": questionnaire, "files": files}


def _write_text(path: pathlib.Path, text: str) -> None:
  tmp = store.atomic_path(path)
  tmp.write_text(text)
  os.replace(tmp, path)


def _csv_text(header: list[str], rows: list[list]) -> str:
  import io
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return out.getvalue()


def own_trait_scores(profiles, questionnaire) -> dict[str, np.ndarray] | None:
  """Each profile's trait scores from its own 120 known answers `{trait: f64[profiles]}`, when
  every statement is an IPIP-NEO item; else None."""
  if questionnaire_lib.ipip_indices(questionnaire) is None:
    return None
  from palign_jax.evaluation import plots
  known = np.stack([np.asarray(p.known_answers) for p in profiles])
  scores = plots.trait_scores(known, data.load_split().known)  # [profiles, 5] in TRAITS order
  return {t: scores[:, k] for k, t in enumerate(data.TRAITS)}


def write_outputs(out: pathlib.Path, questionnaire, labels, profiles, log_probs,
                  readout: str) -> dict[str, pathlib.Path]:
  """answers.csv / answers.jsonl, and with traits trait_scores.csv, summary.md and the plot."""
  q, keys = questionnaire, questionnaire.scale.keys
  probs = questionnaire_lib.option_probabilities(log_probs)  # [P, I, O]
  mass = np.exp(np.asarray(log_probs, np.float64)).sum(-1)
  answers = {r: questionnaire_lib.read(log_probs, q.scale.values, r)
             for r in questionnaire_lib.READOUTS}
  rows, lines = [], []
  for p, label in enumerate(labels):
    for i, item in enumerate(q.items):
      sign = "+" if q.keyed[i] > 0 else "-"
      given = {r: float(answers[r][p, i]) for r in answers}
      rows.append([label, profiles[p].method, item, q.traits[i], sign,
                   *(f"{v:.6f}" for v in probs[p, i]), f"{mass[p, i]:.6f}",
                   *(f"{v:g}" for v in given.values())])
      lines.append(json.dumps({"profile": label, "profile_method": profiles[p].method,
                               "item": item, "trait": q.traits[i], "keyed": sign,
                               "probabilities": dict(zip(keys, probs[p, i].tolist(),
                                                         strict=True)),
                               "option_mass": float(mass[p, i]), "answers": given}))
  files = {"answers.csv": out / "answers.csv", "answers.jsonl": out / "answers.jsonl"}
  header = ["profile", "profile_method", "item", "trait", "keyed", *(f"p_{k}" for k in keys),
            "option_mass", *questionnaire_lib.READOUTS]
  _write_text(files["answers.csv"], _csv_text(header, rows))
  _write_text(files["answers.jsonl"], "\n".join(lines) + "\n")
  if not q.has_traits:
    return files
  traits, scores = zip(*[questionnaire_lib.trait_scores(answers[r], q)
                         for r in questionnaire_lib.READOUTS], strict=True)
  traits = traits[0]
  own = own_trait_scores(profiles, q)
  own_of = (lambda t: own.get(t)) if own else (lambda t: None)
  table = [[label, t, *(f"{s[p, k]:.4f}" for s in scores),
            "" if own_of(t) is None else f"{own_of(t)[p]:.4f}"]
           for p, label in enumerate(labels) for k, t in enumerate(traits)]
  files["trait_scores.csv"] = out / "trait_scores.csv"
  _write_text(files["trait_scores.csv"], _csv_text(
      ["profile", "trait", *questionnaire_lib.READOUTS, "own_answers"], table))
  chosen = scores[questionnaire_lib.READOUTS.index(readout)]
  files["summary.md"] = out / "summary.md"
  _write_text(files["summary.md"], summary_table(traits, chosen, own_of, readout))
  files["trait_scores.png"] = out / "trait_scores.png"
  plot_trait_scores(traits, chosen, own_of, files["trait_scores.png"],
                    f"{q.source}: {len(labels)} profile(s), readout {readout}",
                    (q.scale.values.min(), q.scale.values.max()))
  return files


def summary_table(traits, scores: np.ndarray, own_of, readout: str) -> str:
  """Markdown: per trait, the distribution of `scores [profiles, traits]` over profiles (and
  the profiles' own scores and the mean absolute difference where known)."""
  lines = [f"| trait | mean ({readout}) | sd | min | max | own answers, mean | mean abs diff |",
           "|---|---|---|---|---|---|---|"]
  for k, t in enumerate(traits):
    s, own = scores[:, k], own_of(t)
    extra = ("| | |" if own is None else
             f"| {np.nanmean(own):.2f} | {np.nanmean(np.abs(s - own)):.2f} |")
    lines.append(f"| {data.TRAIT_NAMES.get(t, t)} | {s.mean():.2f} | {s.std():.2f} | "
                 f"{s.min():.2f} | {s.max():.2f} " + extra)
  return "\n".join(lines) + "\n"


def plot_trait_scores(traits, scores: np.ndarray, own_of, path: pathlib.Path, title: str,
                      value_range: tuple[float, float]) -> None:
  """Per trait, each profile's score (dots, box) and its own known-answer score (rings), on
  the scale's whole range."""
  import matplotlib
  matplotlib.use("Agg")  # files only
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1.6 * len(traits) + 2, 4))
  x = np.arange(len(traits))
  ax.boxplot([scores[:, k] for k in range(len(traits))], positions=x, widths=0.5,
             showfliers=False)
  jitter = np.linspace(-0.12, 0.12, len(scores)) if len(scores) > 1 else np.zeros(1)
  for k, t in enumerate(traits):
    ax.scatter(x[k] + jitter, scores[:, k], s=14, color="#3a6ea5",
               label="model" if k == 0 else None, zorder=3)
    if own_of(t) is not None:
      ax.scatter(x[k] + jitter + 0.3, own_of(t), s=18, facecolors="none", edgecolors="#d08c2e",
                 label="own answers" if k == 0 else None, zorder=3)
  ax.set_xticks(x, [data.TRAIT_NAMES.get(t, t) for t in traits], rotation=15)
  ax.set_ylabel("trait score")
  ax.set_ylim(value_range[0] - 0.25, value_range[1] + 0.25)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = store.atomic_path(path)
  fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  os.replace(tmp, path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  config = common.resolved_config(_CONFIG, model=_MODEL.value)
  with config.unlocked():
    for field, flag in (("questionnaire", _QUESTIONNAIRE), ("profiles", _PROFILES)):
      if flag.value is not None:
        config.answer[field] = flag.value
  output_dir = common.output_dir("answer")
  result = run(config, output_dir)
  if "summary.md" in result["files"]:
    print(result["files"]["summary.md"].read_text())
  n = len(result["labels"])
  print(f"{n} profile{'' if n == 1 else 's'} x {len(result['questionnaire'].items)} items; "
        f"wrote {', '.join(str(p) for p in result['files'].values())}")


if __name__ == "__main__":
  common.run(main)
