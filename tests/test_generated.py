"""The generated readout: the reference's answer parser, and prefix-shared greedy generation
against transformers' PyTorch model (full prompts, `generate`) on the same tiny random weights.

Random weights write no answers, so the generation is checked twice: with the real tokenizer
(token ids and texts), and with a stand-in tokenizer that spells each token id as an answer
fragment ("A", ")", " B", ...), so that early stopping settles on real letters.
"""

import contextlib
import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_llama import o_proj_bias  # noqa: E402

from palign_jax import generated, prompts  # noqa: E402
from palign_jax.errors import UserInputError  # noqa: E402

# Every format found in the reference's parser (baseline_utils.process_answers: the first
# [a-eA-E][^a-zA-Z] within the reply's first 12 characters) -> the answer it reads.
PARSED = {
    "Option (A)": 5, "Option (A). Very Accurate": 5, "\n\nOption (B). Moderately": 4,
    " Option (b)": 4, "(C)": 3, "(C). Neither Accurate Nor Inaccurate": 3, "D.": 2, "D)": 2,
    "d)": 2, "E": 1, "e": 1, "Option: C": 3, "Option C": 3, "Answer: E": 1,
    # the letter directly after our prefill "Option (", with or without the prefill
    "A). Very Accurate": 5, "B": 4, prompts.ANSWER_PREFILL + "E). Very Inaccurate": 1,
    prompts.ANSWER_PREFILL + "c": 3,
}
UNPARSABLE = [
    "Moderately Accurate", "Very Accurate", "Very Inaccurate", "Neither Accurate Nor Inaccurate",
    "Very Accurate (A)",  # option text before the letter
    "My answer is B", prompts.ANSWER_PREFILL + "Answer: E",  # letter past 12 characters
    "Option (Accurate)", "Option (F)", "Option", "", "  "
]
MISREAD = {  # the reference reads the first a-e ending a word, as `parse_option` does
    "The answer is (A)": 1, "I would say B": 2, "I choose option (C)": 1, "Based on (B)": 2,
    "Option (AB)": 4,  # A is followed by a letter, B by ")"
}


def test_parse_option_reads_what_the_reference_reads():
  for text, value in {**PARSED, **MISREAD}.items():
    assert generated.parse_option(text) == value, text
  for text in UNPARSABLE:
    assert generated.parse_option(text) == 0, text
  # Letters A..E are the answer values 5..1 (readout.LETTER_VALUES).
  assert [generated.parse_option(f"{x})") for x in prompts.OPTION_LETTERS] == [5, 4, 3, 2, 1]


def test_settled_parses_never_change():
  """Early stopping's rule: once `_parse` says settled, no continuation changes the answer."""
  rng = np.random.default_rng(0)
  alphabet = list("ABCDEFabcdexyz().: \n") + ["\ufffd"]
  for _ in range(3000):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 20)))
    final = generated.parse_option(text)
    for k in range(len(text) + 1):
      answer, settled = generated._parse(text[:k], complete=False)
      if settled:
        assert answer == final, (text, k)
    assert generated._parse(text, complete=True) == (final, True)


def test_agreement_counts_unparsable_as_disagreeing():
  log_probs = np.log(np.array([[[.6, .1, .1, .1, .1], [.1, .1, .1, .1, .6]],
                               [[.1, .6, .1, .1, .1], [.1, .1, .6, .1, .1]]]))
  got = generated.agreement(np.array([[5, 2], [0, 3]]), log_probs)  # argmax: [[5, 1], [4, 3]]
  assert got == {"rows": 4, "agree": 2, "agreement": 0.5, "agreement_parsed": 2 / 3,
                 "unparsable": 1}
  with pytest.raises(UserInputError, match="shape"):
    generated.agreement(np.array([5, 2]), log_probs)


ITEMS = np.array([0, 7, 150, 299, 42])
SYSTEMS = ("You are a cat.", prompts.DEFAULT_SYSTEM_PROMPT + " Answer briefly, please.")
FRAGMENTS = ["A", ")", " B", ".", "c", "x", "Very", " Accurate", ":", "(", "E", "\n"]


class SpellingTokenizer:
  """Spells token id t as FRAGMENTS[t % len(FRAGMENTS)]: answer-like texts from random ids."""

  eos_token_id = None

  def decode(self, ids, skip_special_tokens=True):
    return "".join(FRAGMENTS[t % len(FRAGMENTS)] for t in ids)


@pytest.fixture(scope="module")
def setup(tiny_engine, tiny_model_dir):
  """The contexts, a steering delta for context 0 only, and transformers' greedy 15 tokens
  for every (context, item) row, computed on the full prompt."""
  contexts = [tiny_engine.context_tokens(s) for s in SYSTEMS]
  c = tiny_engine.config
  steering = np.zeros((2, c.num_layers, c.num_heads, c.head_dim), np.float32)
  steering[0] = np.random.default_rng(1).normal(0, 0.5, steering.shape[1:])
  model = transformers.LlamaForCausalLM.from_pretrained(
      tiny_model_dir, attn_implementation="eager", dtype=torch.float32).eval()
  reference = np.zeros((2, len(ITEMS), generated.REFERENCE_MAX_NEW_TOKENS), np.int64)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: 20x faster than with threads fighting JAX's
  try:
    _torch_greedy(model, contexts, tiny_engine.question_tokens(ITEMS), steering, reference)
  finally:
    torch.set_num_threads(threads)
  return contexts, steering, reference


def _torch_greedy(model, contexts, questions, steering, reference):
  """reference[c, i] = transformers' greedy tokens after context c + question i."""
  for ci, context in enumerate(contexts):
    for i, question in enumerate(questions):
      ids = torch.from_numpy(np.concatenate([context, question])[None].astype(np.int64))
      steer = o_proj_bias(model, steering[ci]) if ci == 0 else contextlib.nullcontext()
      with steer, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=reference.shape[-1],
                             min_new_tokens=reference.shape[-1], pad_token_id=0)
      reference[ci, i] = out[0, ids.shape[1]:].numpy()


def expected(tokenizer, ids, eos=()):
  """The reference's answer to a row's full greedy reply (cut at the first eos)."""
  ids = list(ids)
  ended = next((k for k, t in enumerate(ids) if t in eos), None)
  text = tokenizer.decode(ids if ended is None else ids[:ended], skip_special_tokens=True)
  return generated._parse(prompts.ANSWER_PREFILL + text, complete=ended is not None)[0], ended


def test_generate_answers_equals_transformers_greedy(tiny_engine, setup):
  contexts, steering, reference = setup
  tokenizer = tiny_engine.model.tokenizer
  # 10 rows in batches of 4 (the last one padded); both contexts encoded together.
  out = generated.generate_answers(tiny_engine, contexts, ITEMS, steering=steering,
                                   batch_rows=4)
  assert out.answers.shape == (2, len(ITEMS))
  for ci in range(2):
    for i in range(len(ITEMS)):
      full = tokenizer.decode(reference[ci, i].tolist(), skip_special_tokens=True)
      text = out.texts[ci][i]
      assert text and full.startswith(text), (ci, i, text, full)
      assert out.answers[ci, i] == expected(tokenizer, reference[ci, i])[0]
  assert out.unparsable == int((out.answers == 0).sum())
  q_tokens = sum(map(len, tiny_engine.question_tokens(ITEMS)))
  assert out.prompt_tokens == sum(map(len, contexts)) + 2 * q_tokens
  assert 2 * len(ITEMS) <= out.generated_tokens <= reference.size
  # Steering changed context 0's replies (the reference above was steered there only).
  plain = generated.generate_answers(tiny_engine, contexts[:1], ITEMS, batch_rows=4)
  assert any(not (a.startswith(b) or b.startswith(a))
             for a, b in zip(plain.texts[0], out.texts[0], strict=True))


def test_generate_answers_stops_early_and_agrees_on_answer_texts(tiny_engine, setup):
  contexts, steering, reference = setup
  spelled = copy.copy(tiny_engine)
  spelled.model = dataclasses.replace(tiny_engine.model, tokenizer=SpellingTokenizer())
  eos = int(reference[1, 1, 4])  # ends one row after 5 tokens (and any row emitting it)
  want = [[expected(SpellingTokenizer(), reference[ci, i], {eos}) for i in range(len(ITEMS))]
          for ci in range(2)]
  out = generated.generate_answers(spelled, contexts, ITEMS, steering=steering, eos_ids=[eos],
                                   batch_rows=4)
  np.testing.assert_array_equal(out.answers, [[a for a, _ in row] for row in want])
  assert (out.answers > 0).any() and (out.answers == 0).any()
  for ci in range(2):
    for i in range(len(ITEMS)):
      ended = want[ci][i][1]
      full = SpellingTokenizer().decode(reference[ci, i, :ended])
      assert full.startswith(out.texts[ci][i])
      if ended is not None:  # a row never runs past its eos
        assert len(out.texts[ci][i]) <= len(full)
  # Stopped early: fewer than 15 tokens per row.
  assert out.generated_tokens < reference.size
  # Rows checked every 4 tokens: the same answers, more tokens.
  coarse = generated.generate_answers(spelled, contexts, ITEMS, steering=steering,
                                      eos_ids=[eos], chunk_tokens=4, batch_rows=4)
  np.testing.assert_array_equal(coarse.answers, out.answers)
  assert coarse.generated_tokens > out.generated_tokens


def test_generate_answers_rejects_bad_inputs(tiny_engine):
  context = tiny_engine.context_tokens("Hi.")
  with pytest.raises(UserInputError, match="steering has shape"):
    generated.generate_answers(tiny_engine, [context], ITEMS[:1],
                               steering=np.zeros((2, 1, 1, 1), np.float32))
  with pytest.raises(UserInputError, match="max_new_tokens"):
    generated.generate_answers(tiny_engine, [context], ITEMS[:1], max_new_tokens=0)
  with pytest.raises(UserInputError, match="no items"):
    generated.generate_answers(tiny_engine, [context], np.array([], int))


def test_generated_readout_in_the_protocol_and_records(tiny_engine):
  """`config.readout.generated`: few_shot and pas records get a `generated` row, equal to
  `generate_answers` on the same contexts (pas at its chosen alpha), unparsable answers
  counted, never dropped, and the agreement with the argmax letter recorded."""
  import jax
  from conftest import tiny_run_config

  from palign_jax import data
  from palign_jax.pas import fit as pas_fit
  from palign_jax.protocol import alignment, records

  heldout = data.load_split().heldout[::12]
  papi = data.load_papi_subjects()
  subjects = papi.select([papi.ids[0]])
  c = tiny_engine.config
  settings = alignment.AlignSettings.from_config(
      tiny_run_config("unused", **{"readout.generated": True}), c.num_layers * c.num_heads)
  (result,) = alignment.align_subjects(tiny_engine, tiny_engine.activations(), subjects,
                                       settings, heldout=heldout)
  context = [tiny_engine.context_tokens(prompts.few_shot_system_prompt(
      data.known_answers(subjects)[0]))]
  plain = generated.generate_answers(tiny_engine, context, heldout)
  np.testing.assert_array_equal(result.generated["few_shot"], plain.answers[0])
  alpha = result.chosen_alpha["kfold_known"][result.chosen_decoding["pas"]]
  assert result.generated_agreement["pas"]["rows"] == len(heldout)
  fit = pas_fit.fit_pas(tiny_engine.activations(), data.known_answers(subjects).astype(np.int32),
                        settings.fit, key=jax.random.fold_in(jax.random.PRNGKey(0), 0),
                        subject_ids=alignment.subject_seeds(subjects.ids))
  steered = generated.generate_answers(tiny_engine, context, heldout,
                                       steering=pas_fit.steering_for_alpha(fit, alpha))
  np.testing.assert_array_equal(result.generated["pas"], steered.answers[0])
  few, pas = records.pas_records(result, subjects.answers[0], ["few_shot", "pas"])
  for record, row in ((few, "few_shot"), (pas, "pas")):
    entry = record["decodings"]["generated"]
    assert entry["predictions"] == [int(a) for a in result.generated[row]]
    answered = subjects.answers[0, heldout] > 0
    assert entry["n_unparsable"] == int(((result.generated[row] == 0) & answered).sum())
    assert entry["agreement_with_argmax"] == result.generated_agreement[row]
