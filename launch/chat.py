"""Talk to an aligned model next to the unaligned one, and re-administer the inventory.

    python -m launch.chat --profile=runs/align/profiles/172481 --prompt="Describe your weekend."
    python -m launch.chat --profile=... --prompts_file=questions.txt
    python -m launch.chat --profile=... --inventory      # Big Five of the aligned model
    python -m launch.chat --profile=...                  # interactive (empty line quits)

The aligned model is the profile's context plus what it carries: for a PAS
profile the subject's few-shot system prompt and the steering, for a DPO profile
(`launch.align --align_method=dpo`) the default system prompt and the LoRA
adapter. The unaligned model is the same model with the default system prompt,
no steering and no adapter.
"""

from __future__ import annotations

from launch import common

common.require_runtime()  # before the imports it checks

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from absl import flags

from palign_jax import data, prompts, readout, scoring
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
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per answer.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (with --temperature > 0).")
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


def answer(engine, profile: profile_lib.AlignmentProfile, question: str,
           steering: np.ndarray | None) -> str:
  """The aligned model's reply: steering through `engine.generate`; with an adapter,
  `scoring.generate` with the adapter in every forward pass."""
  options = dict(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                 seed=_SEED.value)
  if profile.adapters is None:
    return engine.generate(profile.system_prompt, question, steering, **options)
  tokenizer = engine.model.tokenizer
  tokens = prompts.encode_chat_prompt(tokenizer, profile.system_prompt, question)
  eos = [i for i in {tokenizer.eos_token_id} if i is not None]
  (out,) = scoring.generate(engine.model.params, engine.config, [tokens],
                            adapters=profile.adapters, steering=steering, eos_ids=eos,
                            **options)
  return tokenizer.decode(out, skip_special_tokens=True).strip()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserInputError(f"unexpected arguments {argv[1:]}; see --help")
  if not _PROFILE.value:
    raise UserInputError("--profile is required (a directory written by launch.align)")
  from palign_jax import engine as engine_lib
  config = common.resolved_config(_CONFIG, model=_MODEL.value)
  engine = engine_lib.Engine.from_config(config)
  profile = profile_lib.load_profile(_PROFILE.value, model_fingerprint=engine.fingerprint,
                                     prompt_version=prompts.PROMPT_VERSION)
  print(describe(profile, _ALPHA.value))
  steering = _steering_of(profile)
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
    for question in batch:
      unaligned = engine.generate(prompts.DEFAULT_SYSTEM_PROMPT, question, None,
                                  max_new_tokens=_MAX_NEW_TOKENS.value,
                                  temperature=_TEMPERATURE.value, seed=_SEED.value)
      aligned = answer(engine, profile, question, steering)
      print(f"\n> {question}\n--- unaligned ---\n{unaligned}\n--- aligned to "
            f"{profile.subject_id} ---\n{aligned}")
      sys.stdout.flush()
    if not interactive:
      break


if __name__ == "__main__":
  common.run(main)
