"""Talk to an aligned model next to the unaligned one, and re-administer the inventory.

    python -m launch.chat --profile=runs/align/profiles/172481 --prompt="Describe your weekend."
    python -m launch.chat --profile=... --prompts_file=questions.txt
    python -m launch.chat --profile=... --inventory      # Big Five of the aligned model
    python -m launch.chat --profile=...                  # interactive (empty line quits)
    python -m launch.chat --profiles=runs/me/profiles --prompts_file=questions.txt
    python -m launch.chat --profiles='runs/*/profiles/*' --prompt=Hi --output_file=replies.csv

The aligned model is the profile's context plus what it carries: for a PAS
profile the subject's few-shot system prompt and the steering, for a DPO profile
(`launch.align --align_method=dpo`) the default system prompt and the LoRA
adapter. The unaligned model is the same model with the default system prompt,
no steering and no adapter. With --profiles, every profile and the unaligned
model answer each prompt in one batched generation (per-row context, steering
and adapter), printed side by side (and written as CSV with --output_file).

Generation: sampling with temperature, top-p, a repetition penalty and a
no-repeat n-gram ban by default (config.generation; greedy decoding of the
135M embedded model loops on a long context); --greedy for argmax. A reply
stops at the end of the assistant's turn.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import csv
import dataclasses
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from absl import flags

from palign_jax import api, data, prompts, readout
from palign_jax.errors import UserInputError
from palign_jax.evaluation import plots
from palign_jax.protocol import profile as profile_lib

_CONFIG = common.config_flag()
_PROFILE = flags.DEFINE_string("profile", None, "Alignment profile directory written by "
                               "launch.align (OUTPUT_DIR/profiles/<subject>).")
_MODEL = common.shorthand_flag("model", common.MODEL_HELP)
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt to answer.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file, one prompt per line.")
_INVENTORY = flags.DEFINE_bool("inventory", False, "Re-administer all 300 items to the aligned "
                               "and unaligned model and print their Big Five profiles next to "
                               "the person's.")
_PROFILES = (flags.FLAGS["profiles"] if "profiles" in flags.FLAGS else flags.DEFINE_string(
    "profiles", None, "Many profiles at once: a folder of them, a run folder, a quoted glob or "
    "a comma-separated list; every profile and the unaligned model answer each prompt in one "
    "batched generation."))
_OUTPUT_FILE = flags.DEFINE_string("output_file", None, "With --profiles: also write the replies "
                                   "as CSV (one row per prompt, one column per profile).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens generated per answer "
                                       "(default config.generation.max_new_tokens, 96).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; 0 = greedy "
                                  "(default config.generation.temperature, 0.7).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: sample from the most likely "
                            "tokens holding this much probability; 1 = off (default 0.9).")
_REPETITION_PENALTY = flags.DEFINE_float(
    "repetition_penalty", None, "Divide (positive) logits of tokens the reply already holds by "
    "this; 1 = off (default config.generation.repetition_penalty, 1.2).")
_NO_REPEAT_NGRAM = flags.DEFINE_integer(
    "no_repeat_ngram_size", None, "Never repeat an n-gram of the reply; 0 = off (default 4).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding, no penalty, no n-gram ban: the "
                            "model's raw most likely reply (same as --temperature=0 "
                            "--repetition_penalty=1 --no_repeat_ngram_size=0).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default config.generation.seed); the "
                             "same seed gives the same replies, whatever the batch.")
_ALPHA = flags.DEFINE_float("alpha", None, "Override the profile's alpha (profiles with "
                            "steering only).")


def _prompts() -> list[str] | None:
  if _PROMPT.value is not None:
    return [_PROMPT.value]
  if _PROMPTS_FILE.value is not None:
    path = pathlib.Path(_PROMPTS_FILE.value)
    if not path.is_file():
      raise UserInputError(f"{path}: no such file (--prompts_file)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
  return None


def describe(profile: profile_lib.AlignmentProfile, alpha: float | None) -> str:
  """One line: what the profile aligns with."""
  parts = []
  if profile.has_steering:
    parts.append(f"alpha {profile.alpha if alpha is None else alpha} "
                 f"({profile.alpha_selection}), {int(profile.head_mask.sum())} steered heads")
  if profile.method == "dpo":
    s = profile.settings
    adapter = (f"LoRA adapter on {', '.join(profile.adapters)}, {s.get('steps')} DPO steps "
               f"chosen by k-fold on the known items" if profile.adapters is not None
               else "no adapter (the base model)")
    parts.append(adapter + f", {s.get('num_pairs')} preference pairs"
                 + (f"; note: {s['note']}" if s.get("note") else ""))
  return f"Profile of subject {profile.subject_id} ({profile.method}): " + "; ".join(parts) + "."


def _steering_of(profile: profile_lib.AlignmentProfile) -> np.ndarray | None:
  if _ALPHA.value is not None and not profile.has_steering:
    raise UserInputError(f"--alpha: the profile of {profile.subject_id} has no steering "
                         f"({profile.method} profile); leave --alpha out")
  return profile.steering(_ALPHA.value)


def inventory_table(engine, profile: profile_lib.AlignmentProfile, person: np.ndarray) -> str:
  """Trait scores (1..5) on all 300 items: person (where answered), unaligned, aligned."""
  everything = np.arange(data.NUM_ITEMS)
  steering = _steering_of(profile)
  if steering is not None:
    steering = jnp.asarray(steering)[None, None]  # [1 context, 1 alpha, ...]
  adapters = None
  if profile.adapters is not None:  # [1 context, ...]
    adapters = {t: {k: v[None] for k, v in f.items()} for t, f in profile.adapters.items()}
  aligned, aligned_prior = engine.score([engine.context_tokens(profile.system_prompt)],
                                        everything, steering=steering, content_free=True,
                                        adapters=adapters)
  unaligned, unaligned_prior = engine.score_systems([prompts.DEFAULT_SYSTEM_PROMPT], everything,
                                                    content_free=True)
  decoding = profile.settings.get("decoding", readout.DECODINGS[0])
  # `matched` needs known-item scores without their answers in the context; the inventory
  # re-asks every item under the profile's context, so it reads the median instead.
  read = lambda log_probs, prior: readout.decode(log_probs, decoding, prior=prior)[0]
  rows = {
      "person": plots.trait_scores(person, everything),
      "unaligned model": plots.trait_scores(read(unaligned[0], unaligned_prior[0]), everything),
      "aligned model": plots.trait_scores(read(aligned[0], aligned_prior[0]), everything),
  }
  lines = [f"{'':16}" + "".join(f"{data.TRAIT_NAMES[t]:>19}" for t in data.TRAITS)]
  for name, scores in rows.items():
    lines.append(f"{name:16}" + "".join(f"{v:>19.2f}" for v in scores))
  return "\n".join(lines)


def options() -> dict:
  """`scoring.generate` settings: config.generation, then the flags given."""
  given = {"max_new_tokens": _MAX_NEW_TOKENS.value, "temperature": _TEMPERATURE.value,
           "top_p": _TOP_P.value, "repetition_penalty": _REPETITION_PENALTY.value,
           "no_repeat_ngram_size": _NO_REPEAT_NGRAM.value, "seed": _SEED.value}
  if _GREEDY.value:
    given.update(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
  return api.generation_options(_CONFIG.value, **{k: v for k, v in given.items()
                                                  if v is not None})


def describe_options(settings: dict) -> str:
  """One line: how replies are decoded."""
  if settings["temperature"] == 0:
    how = "greedy"
  else:
    how = f"sampled at temperature {settings['temperature']}, top-p {settings['top_p']}"
  return (f"Generation: {how}, repetition penalty {settings['repetition_penalty']}, "
          f"no-repeat n-gram {settings['no_repeat_ngram_size'] or 'off'}, seed "
          f"{settings['seed']}, at most {settings['max_new_tokens']} tokens.")


def what_it_adds(profile: profile_lib.AlignmentProfile, tokenizer) -> str:
  """What the aligned side has that the unaligned one lacks."""
  context = ("the default system prompt" if profile.system_prompt == prompts.DEFAULT_SYSTEM_PROMPT
             else f"a system prompt of {int((profile.known_answers > 0).sum())} questionnaire "
             f"answers ({len(tokenizer.encode(profile.system_prompt))} tokens)")
  parts = [f"context: {context}"]
  if profile.has_steering:
    parts.append(f"steering at alpha {profile.alpha:g}" + (" (none: alpha 0)"
                                                            if not profile.alpha else ""))
  if profile.adapters is not None:
    parts.append(f"LoRA adapter on {', '.join(profile.adapters)}")
  return "; ".join(parts)


def answer(engine, profile: profile_lib.AlignmentProfile, question: str,
           steering: np.ndarray | None = None) -> str:
  """The aligned model's reply (its context, steering and adapter; `steering` unused, kept for
  callers: the profile's alpha, or --alpha's, steers)."""
  return api.generate(engine, [profile], [question], **options())[0][0]


def side_by_side(engine, labels: list[str], profiles: list, questions: list[str]) -> list[list]:
  """Prints each prompt's replies, unaligned first, then every profile (one generation for
  all); returns the rows `[prompt, unaligned, *profiles]`."""
  settings = options()
  print(describe_options(settings))
  for label, p in zip(labels, profiles, strict=True):
    print(f"  {label} ({p.method}): {what_it_adds(p, engine.model.tokenizer)}")
  replies = api.generate(engine, [None, *profiles], questions, **settings)
  rows = []
  for q, question in enumerate(questions):
    row = [question] + [r[q] for r in replies]
    print(f"\n> {question}")
    for label, reply in zip(["unaligned", *labels], row[1:], strict=True):
      print(f"--- {label} ---\n{reply}")
    rows.append(row)
  sys.stdout.flush()
  return rows


def _many(engine) -> None:
  if _INVENTORY.value or _ALPHA.value is not None or _PROFILE.value:
    raise UserInputError("--profiles takes neither --profile, --inventory nor --alpha (use "
                         "launch.answer to administer a questionnaire to many profiles)")
  questions = _prompts()
  if not questions:
    raise UserInputError("--profiles needs --prompt or --prompts_file")
  labels, profiles = profile_lib.load_profiles(_PROFILES.value,
                                               model_fingerprint=engine.fingerprint,
                                               prompt_version=prompts.PROMPT_VERSION)
  rows = side_by_side(engine, labels, profiles, questions)
  if _OUTPUT_FILE.value:
    with open(_OUTPUT_FILE.value, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["prompt", "unaligned", *labels])
      writer.writerows(rows)
    print(f"\nwrote {_OUTPUT_FILE.value}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  if not _PROFILE.value and not _PROFILES.value:
    raise UserInputError("--profile (a directory written by launch.align) or --profiles is "
                         "required")
  from palign_jax import engine as engine_lib
  config = common.resolved_config(_CONFIG, model=_MODEL.value)
  options()  # bad generation settings stop here, before the model loads
  engine = engine_lib.Engine.from_config(config)
  if _PROFILES.value:
    return _many(engine)
  profile = profile_lib.load_profile(_PROFILE.value, model_fingerprint=engine.fingerprint,
                                     prompt_version=prompts.PROMPT_VERSION)
  print(describe(profile, _ALPHA.value))
  _steering_of(profile)  # refuses --alpha for a profile without steering
  if _ALPHA.value is not None:
    profile = dataclasses.replace(profile, alpha=_ALPHA.value)
  if _INVENTORY.value:
    person = np.zeros(data.NUM_ITEMS, np.int64)
    papi = data.load_papi_subjects()
    if profile.subject_id in papi.ids:
      person = papi.answers[papi.ids.index(profile.subject_id)].astype(np.int64)
    else:
      person[data.load_split().known] = profile.known_answers
    print(inventory_table(engine, profile, person))
  questions = _prompts()
  interactive = questions is None and not _INVENTORY.value
  label = f"aligned to {profile.subject_id}"
  while True:
    if interactive:
      try:
        line = input("\nyou> ").strip()
      except EOFError:
        break
      if not line:
        break
      batch = [line]
    else:
      batch = questions or []
    if batch:
      side_by_side(engine, [label], [profile], batch)
    if not interactive:
      break


if __name__ == "__main__":
  common.run(main)
