"""Prompts: the PAPI question template, system prompts, chat formatting to token ids.

Owns every string the model sees and how it becomes tokens. Chat formatting goes
through the tokenizer's own chat template. A conversation is split into a
*prefix* (the system turn, shared by all of a subject's questions and encoded
once) and a *suffix* (the user question and the assistant's opening words, after
which the answer letter is read); `encode_question` checks that prefix + suffix
tokenises exactly like the whole conversation.

Bump PROMPT_VERSION whenever a string here changes: caches and alignment
profiles record it and refuse to mix versions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from palign_jax import data
from palign_jax.errors import UserInputError

PROMPT_VERSION = "papi-v1"

DEFAULT_SYSTEM_PROMPT = "You are a helpful, honest and concise assistant."

# The reference's question template (PAlign), with the statement in second person.
QUESTION_TEMPLATE = """Given a statement of you: "You {}."
Please choose from the following options to identify how accurately this statement describes you.
Options:
(A). Very Accurate
(B). Moderately Accurate
(C). Neither Accurate Nor Inaccurate
(D). Moderately Inaccurate
(E). Very Inaccurate
"""

# The assistant's answer begins with this; the next token is the option letter.
ANSWER_PREFILL = "Option ("
OPTION_LETTERS = ("A", "B", "C", "D", "E")  # "Very Accurate" (5) ... "Very Inaccurate" (1)

FEW_SHOT_INTRO = "Here are some of your behaviors and your level of recognition towards them;"


def question(item_text: str) -> str:
  """The user turn asking about one statement (lower-cased, as the reference asks)."""
  return QUESTION_TEMPLATE.format(item_text.lower().rstrip("."))


def activation_question(item_text: str) -> str:
  """The user turn used to record activations (the reference keeps the item's case)."""
  return QUESTION_TEMPLATE.format(item_text.rstrip("."))


def few_shot_system_prompt(known_answers: Sequence[int], split: data.Split | None = None) -> str:
  """The reference's few-shot context: "item text:answer label" for the 120 known items.

  Args:
    known_answers: `int[120]` answers to the known items in short-form order
      (0 = missing: the item is left out rather than labelled 'Unknown').
  """
  split = split or data.load_split()
  items = data.load_items()
  pairs = [f"{items.text[j]}:{data.ANSWER_LABELS[int(a)]}"
           for j, a in zip(split.known, known_answers, strict=True) if a]
  return FEW_SHOT_INTRO + ";".join(pairs)


def description_system_prompt(description: str) -> str:
  """P² (personality prompt) baseline: the subject's description as the system prompt."""
  return description


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """A conversation split for prefix sharing: `prefix + suffix` is the whole prompt."""

  prefix: list[int]
  suffix: list[int]


def _render(tokenizer, messages: list[dict], continue_final: bool) -> str:
  if not getattr(tokenizer, "chat_template", None):
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    raise UserInputError(f"{name}: has no chat template, so chat prompts cannot be built; "
                         "use an instruct model whose tokenizer defines one")
  return tokenizer.apply_chat_template(messages, tokenize=False,
                                       continue_final_message=continue_final)


def _ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def encode_system(tokenizer, system: str) -> list[int]:
  """Token ids of the system turn alone (the shared prefix)."""
  return _ids(tokenizer, _render(tokenizer, [{"role": "system", "content": system}],
                                 continue_final=False))


def encode_conversation(tokenizer, system: str, user: str, assistant: str) -> PromptTokens:
  """Tokens of system + user + the assistant's unfinished reply, split after the system turn."""
  messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
              {"role": "assistant", "content": assistant}]
  whole = _ids(tokenizer, _render(tokenizer, messages, continue_final=True))
  prefix = encode_system(tokenizer, system)
  if whole[:len(prefix)] != prefix:
    raise UserInputError(
        "the chat template renders the system turn differently alone and in a conversation, "
        "so the shared prefix cannot be reused; this model's template is not supported")
  return PromptTokens(prefix=prefix, suffix=whole[len(prefix):])


def encode_chat_prompt(tokenizer, system: str, user: str) -> list[int]:
  """System + user turn + the template's generation prompt, for open-ended answers."""
  messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
  _render(tokenizer, messages[:1], continue_final=False)  # clear error without a template
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return _ids(tokenizer, text)


def encode_question(tokenizer, system: str, item_text: str) -> PromptTokens:
  """A PAPI question whose next token is the answer letter."""
  return encode_conversation(tokenizer, system, question(item_text), ANSWER_PREFILL)


def encode_activation_prompt(tokenizer, item_text: str, letter: str,
                             system: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
  """A question answered with `letter`, end-of-turn removed: the last token is the letter."""
  tokens = encode_conversation(tokenizer, system, activation_question(item_text), letter)
  ids = tokens.prefix + tokens.suffix
  if ids[-1] != option_token_ids(tokenizer, prefill="")[OPTION_LETTERS.index(letter)]:
    raise UserInputError(f"tokenizer: the answer letter {letter!r} is not a token of its own "
                         "at the end of the assistant turn")
  return ids


def option_token_ids(tokenizer, prefill: str = ANSWER_PREFILL) -> np.ndarray:
  """Token ids of the letters A..E as they follow `prefill`, `int[5]`.

  Raises UserInputError if a letter does not tokenise as a single token after the
  prefill (the answer could then not be read from one next-token distribution).
  """
  base = _ids(tokenizer, prefill)
  ids = []
  for letter in OPTION_LETTERS:
    extended = _ids(tokenizer, prefill + letter)
    if extended[:len(base)] != base or len(extended) != len(base) + 1:
      raise UserInputError(f"tokenizer: option letter {letter!r} after {prefill!r} is not a "
                           "single token; the answer cannot be read from the next token")
    ids.append(extended[-1])
  return np.array(ids, np.int32)
