"""Prompts with SmolLM2's real tokenizer: prefix/suffix split, letters, decoding."""

import numpy as np
import pytest

from palign_jax import data, prompts
from palign_jax.errors import UserInputError


@pytest.fixture(scope="module")
def tokenizer():
  from palign_jax.models import gguf, tokenizer
  return tokenizer.tokenizer_from_gguf(gguf.default_gguf_path())


def test_question_prefix_plus_suffix_is_the_whole_conversation(tokenizer):
  system = prompts.few_shot_system_prompt(data.known_answers(data.load_papi_subjects())[0])
  text = data.load_items().text[8]
  tokens = prompts.encode_question(tokenizer, system, text)
  whole = tokenizer.apply_chat_template(
      [{"role": "system", "content": system},
       {"role": "user", "content": prompts.question(text)},
       {"role": "assistant", "content": prompts.ANSWER_PREFILL}],
      tokenize=False, continue_final_message=True)
  assert tokens.prefix + tokens.suffix == tokenizer.encode(whole, add_special_tokens=False)
  assert tokenizer.decode(tokens.suffix).endswith("assistant\nOption (")
  # The suffix does not depend on the system prompt, so it can follow any shared prefix.
  other = prompts.encode_question(tokenizer, "Be brief.", text)
  assert other.suffix == tokens.suffix
  assert '"You would never cheat on my taxes."' in prompts.question(text)


def test_option_letters_and_activation_prompts(tokenizer):
  ids = prompts.option_token_ids(tokenizer)
  assert [tokenizer.decode([i]) for i in ids] == list("ABCDE")
  for letter in ("A", "E"):
    sequence = prompts.encode_activation_prompt(tokenizer, "Worry about things.", letter)
    assert tokenizer.decode(sequence[-1:]) == letter
    assert "Worry about things" in tokenizer.decode(sequence)


def test_few_shot_prompt_wording_skips_missing():
  known = np.full(120, 4)
  known[1] = 0
  text = prompts.few_shot_system_prompt(known)
  assert text.startswith(prompts.FEW_SHOT_INTRO + "Worry about things.:Moderately Accurate;")
  assert "Make friends easily." not in text
  assert text.count(";") == 119  # intro's ';' + 118 separators between 119 answered items


def test_template_missing_is_a_clear_error(tokenizer):
  import copy
  bare = copy.deepcopy(tokenizer)
  bare.chat_template = None
  with pytest.raises(UserInputError, match="no chat template"):
    prompts.encode_system(bare, "x")
