"""A small Python API: load a model, align people, save and load profiles, answer a
questionnaire and generate text for many profiles at once, without a launcher.

    from palign_jax import api
    model = api.load_model("default", config="configs/quickstart.py")
    people = api.align(model, "examples/my_answers.csv")          # honest PAS (or method="dpo")
    api.save(people, "runs/api/profiles")
    people = api.load(model, "runs/api/profiles")
    answers = api.answer(model, people, "examples/weekend_habits.csv")
    replies = api.generate(model, people, ["How was your weekend?"])

Everything runs the launchers' code (`protocol.alignment`, `protocol.dpo`, `administer`,
`scoring.generate`) under one `ml_collections` config (configs/default.py unless given), so a
result here is the launchers' result. Shapes: `Answers.log_probs [profiles, items, options]`;
`generate` returns `[profiles][prompts]` strings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence

import numpy as np

from palign_jax import administer, data, prompts, scoring
from palign_jax import questionnaire as questionnaire_lib
from palign_jax.errors import UserInputError
from palign_jax.protocol import profile as profile_lib

_ROOT = pathlib.Path(__file__).resolve().parent.parent
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def read_config(config=None, **overrides):
  """A run config: None (configs/default.py), a configs/*.py path, or a ConfigDict; then
  `overrides` as dotted fields (`{"pas.folds": 2}`)."""
  if config is None or isinstance(config, str | pathlib.Path):
    path = pathlib.Path(config or _ROOT / "configs" / "default.py")
    spec = importlib.util.spec_from_file_location(f"_palign_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      *path, last = key.split(".")
      node = config
      for part in path:
        node = node[part]
      node[last] = value
  return config


def load_model(model: str = "default", config=None, **overrides):
  """An `engine.Engine` for `model` ('default', a .gguf, a Hugging Face folder); the config
  rides along as `engine.run_config`."""
  from palign_jax import engine as engine_lib
  config = read_config(config, model=model, **overrides)
  engine = engine_lib.Engine.from_config(config)
  engine.run_config = config
  return engine


def _subjects(people) -> data.Subjects:
  """str (PAPI ids, '0:4', an answers file), `data.Subjects`, or `{id: {item: answer}}`."""
  if isinstance(people, data.Subjects):
    return people
  if isinstance(people, str | pathlib.Path):
    return data.parse_subject_spec(str(people), data.load_papi_subjects())
  answers = np.zeros((len(people), data.NUM_ITEMS), np.int8)
  for row, by_item in enumerate(people.values()):
    for item, value in by_item.items():
      answers[row, int(item) - 1] = int(value)
  return data.Subjects(tuple(map(str, people)), answers)


def align(engine, people, *, method: str = "pas") -> list[profile_lib.AlignmentProfile]:
  """One profile per person, aligned on their known (IPIP-NEO-120) answers only, with the
  honest k-fold selection of `launch.align` (`method` "pas" or "dpo"; settings from
  `engine.run_config`). Held-out answers, if any, are never read."""
  from palign_jax.protocol import alignment as alignment_lib
  from palign_jax.protocol import dpo as dpo_lib
  config = getattr(engine, "run_config", None) or read_config()
  subjects = _subjects(people)
  known = data.known_answers(subjects).astype(np.int64)
  common = dict(model_fingerprint=engine.fingerprint, model_source=engine.source)
  no_test = data.load_split().heldout[:0]
  if method == "dpo":
    results = dpo_lib.align_subjects(engine, subjects, dpo_lib.DpoSettings.from_config(config),
                                     heldout=no_test)
    return [profile_lib.profile_from_dpo(r, settings={"dpo": config.dpo.to_dict()}, **common)
            for r in results]
  if method != "pas":
    raise UserInputError(f"align: method {method!r} is not 'pas' or 'dpo'")
  settings = alignment_lib.AlignSettings.for_engine(config, engine)
  alignments = alignment_lib.align_subjects(engine, engine.activations(), subjects, settings,
                                            heldout=no_test)
  return [profile_lib.profile_from_alignment(
      a, known_answers=known[s], selection="kfold_known",
      decoding=a.chosen_decoding.get("pas", "argmax"),
      settings={"pas": config.pas.to_dict(), "seed": int(config.seed)}, **common)
      for s, a in enumerate(alignments)]


def save(profiles: Sequence[profile_lib.AlignmentProfile], folder) -> list[pathlib.Path]:
  """Writes each profile to `folder/<subject id>` (orbax); returns the paths."""
  folder = pathlib.Path(folder)
  safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
  return [profile_lib.save_profile(folder / safe(p.subject_id), p) for p in profiles]


def load(engine, spec) -> list[profile_lib.AlignmentProfile]:
  """Profiles from a folder, glob or list (`profile.load_profiles`), refused unless made on
  `engine`'s model."""
  return profile_lib.load_profiles(spec, model_fingerprint=engine.fingerprint,
                                   prompt_version=prompts.PROMPT_VERSION)[1]


@dataclasses.dataclass(frozen=True)
class Answers:
  """Every profile's answers to every item."""

  questionnaire: questionnaire_lib.Questionnaire
  log_probs: np.ndarray  # f32[profiles, items, options], full-vocabulary log-probabilities

  @property
  def probabilities(self) -> np.ndarray:
    """`[profiles, items, options]`, renormalised over the options."""
    return questionnaire_lib.option_probabilities(self.log_probs)

  def read(self, readout: str = "expected") -> np.ndarray:
    """`[profiles, items]` answers in the scale's values (argmax, median, expected)."""
    return questionnaire_lib.read(self.log_probs, self.questionnaire.scale.values, readout)

  def trait_scores(self, readout: str = "expected") -> dict[str, np.ndarray]:
    """`{trait: f64[profiles]}` (the questionnaire's `trait` and `keyed` columns)."""
    names, scores = questionnaire_lib.trait_scores(self.read(readout), self.questionnaire)
    return {t: scores[:, k] for k, t in enumerate(names)}


def answer(engine, profiles: Sequence[profile_lib.AlignmentProfile], items, *,
           statement_form: str = "you") -> Answers:
  """Every profile answers every item, in one batched scoring call (PAS and DPO mixed).

  items: a questionnaire CSV path, a `Questionnaire`, statements (`list[str]`, PAPI's scale)
  or 0-based IPIP-NEO item indices (`np.ndarray` of ints).
  """
  if isinstance(items, str | pathlib.Path):
    items = questionnaire_lib.load(items)
  elif isinstance(items, np.ndarray):
    items = questionnaire_lib.from_ipip(items)
  elif not isinstance(items, questionnaire_lib.Questionnaire):
    statements = tuple(map(str, items))
    items = questionnaire_lib.Questionnaire(
        "statements", tuple(str(i + 1) for i in range(len(statements))), statements,
        ("",) * len(statements), np.ones(len(statements), np.int64),
        questionnaire_lib.papi_scale(), tuple(range(1, len(statements) + 1)))
  prepared = administer.prepare(engine.model.tokenizer, items, statement_form)
  return Answers(items, administer.score(engine, list(profiles), prepared))


def end_of_turn_ids(tokenizer) -> list[int]:
  """The tokens that end an assistant turn: eos and the chat templates' end-of-turn markers."""
  vocab = tokenizer.get_vocab()
  ids = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
  return sorted(i for i in ids if i is not None)


def generation_options(config=None, **overrides) -> dict:
  """`scoring.generate` keyword arguments from `config.generation`, then `overrides`."""
  g = (config or read_config()).generation
  options = dict(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                 top_p=float(g.top_p), repetition_penalty=float(g.repetition_penalty),
                 no_repeat_ngram_size=int(g.no_repeat_ngram_size), seed=int(g.seed))
  unknown = set(overrides) - set(options)
  if unknown:
    raise UserInputError(f"generate: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(options)}")
  return {**options, **overrides}


def generate(engine, profiles: Sequence[profile_lib.AlignmentProfile | None],
             user_prompts: Sequence[str], **options) -> list[list[str]]:
  """Replies `[profiles][prompts]`, all in one batched generation: each row runs under its
  profile's context, steering (at the profile's alpha) and adapter; `None` is the unaligned
  model (default system prompt). Options: `generation_options` (config.generation)."""
  options = generation_options(getattr(engine, "run_config", None), **options)
  tokenizer, config = engine.model.tokenizer, engine.config
  rows = [(p, q) for p in profiles for q in user_prompts]
  if not rows:
    return [[] for _ in profiles]
  base = profile_lib.AlignmentProfile(
      "unaligned", engine.fingerprint, engine.source, prompts.PROMPT_VERSION,
      prompts.DEFAULT_SYSTEM_PROMPT, 0.0, "none", np.zeros(120, np.int64), None, None, None)
  row_profiles = [p or base for p, _ in rows]
  tokens = [prompts.encode_chat_prompt(tokenizer, p.system_prompt, q)
            for p, q in zip(row_profiles, (q for _, q in rows), strict=True)]
  steering = administer.stack_steering(row_profiles, config)
  out = scoring.generate(
      engine.model.params, config, tokens, options.pop("max_new_tokens"),
      steering=None if steering is None else steering[:, 0],
      adapters=administer.stack_adapters(row_profiles, config),
      eos_ids=end_of_turn_ids(tokenizer), **options)
  texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
  n = len(user_prompts)
  return [texts[i * n:(i + 1) * n] for i in range(len(profiles))]
