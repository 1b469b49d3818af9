"""The paper's own readout: answers parsed from greedily generated text (opt-in).

Owns generated answers. The library reads every answer from the next-token distribution over
the option letters (`readout`, `scoring.score_contexts`); the reference (PAlign's `main.py`)
instead generates up to 15 tokens greedily after the same question and parses the option from
the text. This module does the same, for users reproducing the paper:

* `parse_option`: the reference's answer parser, reimplemented.
* `generate_answers`: greedy generation for many (context, item) rows, prefix-shared like the
  scorer: each context is encoded once into a key/value cache, a batch of its questions runs
  over it, then each row gets its own copy of it for the greedy steps (`llama.forward` takes
  one cache); two jitted kernels, fixed shapes, and a batch stops as soon as every row's option
  is settled (`generate_answers`). Whole-prompt generation (`scoring.generate`, as the
  reference does) re-encodes the context per row: about 14x slower on SmolLM2 with a few-shot
  context (benchmarks/RESULTS_generated.md).
* `agreement`: how often the generated answer equals the argmax-letter answer.

In the reference (github.com/zhu-minjun/PAlign), `main.py`'s `generateAnswer` prompts with
the assistant turn prefilled with "Option" (for Llama 3 it then drops the template's last 5
tokens, `[:-5]`) and generates 15 tokens greedily (`PAlign/pas.py`'s `generate`, top-1);
`baseline_utils.process_answers` (in `main.py` in earlier commits) searches the first 12
characters of the decoded reply (`[:12]`, prefill and leading template whitespace included)
with `re.search(r"[abcdeABCDE][^a-zA-Z]", ...)`: the first letter a-e, in either case,
followed by a character that is not an ASCII letter; A = 5 ("Very Accurate") ... E = 1, none
= "UNK", counted and left out of its scores. Its decoded text keeps special tokens, so a
letter just before the end-of-turn token counts. Hence:

* parsed: "Option (A)", "Option (A). Very Accurate", "(B)", "B.", "B)", "b)", "Option: C",
  "D" alone (then the end of the turn), "Answer: E", and the letter directly after our prefill
  "Option (" ("A). Very Accurate").
* not parsed (0): option text without a letter ("Moderately Accurate", "Very Inaccurate",
  "Neither Accurate Nor Inaccurate"), an option text before its letter ("Very Accurate (A)"),
  a letter after the 12th character ("My answer is B"; after our prefill: "Answer: E"), a
  letter followed by a letter ("Option (Accurate)"), letters other than a-e ("Option (F)").
* misread, as the reference does: any a-e ending a word early in the reply, e.g.
  "The answer is (A)" -> E (the "e" of "The"), "I would say B" -> D ("would"),
  "I choose option (C)" -> E ("choose").

Differences, all at the edges: leading whitespace is skipped before the 12 characters are
counted (the reference counts the template's "\\n\\n" or " "); our prompts prefill "Option ("
rather than "Option", so 4 rather than 6 generated characters fall inside the window; the end
of a finished reply is one non-letter character, where the reference reads the text of the
special tokens that follow (e.g. "<|eot_id|>", whose "d|" it reads as D when the reply
before it is at most a character long).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax import prompts, readout, scoring
from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import KVCache, forward
from palign_jax.models.params import Params

REFERENCE_MAX_NEW_TOKENS = 15  # the reference's `max_new_tokens`
REFERENCE_WINDOW = 12  # characters of the reply the reference searches for a letter
_LETTER = re.compile(r"[a-eA-E][^a-zA-Z]")
_VALUES = dict(zip(prompts.OPTION_LETTERS, readout.LETTER_VALUES.tolist(), strict=True))
_END = "\n"  # stands for the end-of-turn token after a finished reply: not a letter


def _parse(text: str, complete: bool) -> tuple[int, bool]:
  """(answer 1..5 or 0, settled: whether no further text could change it).

  complete: the reply has ended (end-of-turn), so its end follows its last character.
  """
  text = text.lstrip()
  if not complete and "\ufffd" in text:  # an unfinished multi-byte character: not read yet
    text = text[:text.index("\ufffd")]
  match = _LETTER.search((text + _END if complete else text)[:REFERENCE_WINDOW])
  if match:  # the letter and what follows it are there: later text cannot come before them
    return _VALUES[match.group()[0].upper()], True
  return 0, complete or len(text) >= REFERENCE_WINDOW


def parse_option(text: str) -> int:
  """The answer value 1..5 the reference would read from a finished reply, or 0 if none.

  text: the assistant's reply as the reference reads it, from its start (our generations:
  `prompts.ANSWER_PREFILL + generated`); a bare continuation of the prefill ("A). Very
  Accurate", "B") parses too. The end of `text` is taken as the end of the turn.
  """
  return _parse(text, complete=True)[0]


@dataclasses.dataclass(frozen=True)
class GeneratedAnswers:
  """What `generate_answers` returns."""

  answers: np.ndarray  # int[contexts, items]: 1..5, or 0 where the text could not be parsed
  texts: list[list[str]]  # [contexts][items]: generated text after the prefill, to its stop
  generated_tokens: int  # tokens generated over the real rows, each up to where it stopped
  prompt_tokens: int  # tokens run through the model before generating: contexts + questions
  seconds: float  # wall time of the whole call (compilation included on a first call)

  @property
  def unparsable(self) -> int:
    return int((self.answers == 0).sum())


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _start_rows(params: Params, config: ModelConfig, cache: KVCache, context_lengths, context,
                tokens, lengths, steering, eos_ids, max_new_tokens: int):
  """Runs B questions after one cached context and picks each row's first answer token.

  cache: `encode_prefixes` of P contexts ([layers, P, S, ...]), context_lengths int32[P];
  context: which of them the rows continue; tokens int32[B, T], lengths int32[B]: right-padded
  questions; steering None or [P, layers, heads, head_dim].
  -> the generation state `_continue_rows` takes: every row gets its own copy of the context's
  keys/values, then its question's, then room for max_new_tokens.
  """
  B, T = tokens.shape
  pick = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, context, 1, axis=axis)
  keys, values = pick(cache.keys, 1), pick(cache.values, 1)  # [layers, 1, S, kv_heads, hd]
  mask = pick(cache.mask, 0)
  steering = None if steering is None else jax.lax.dynamic_index_in_dim(steering, context, 0,
                                                                        keepdims=False)
  start = context_lengths[context]
  q_mask = jnp.arange(T)[None] < lengths[:, None]
  out = forward(params, config, tokens,  # the context shared by the rows (never broadcast)
                jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T)),
                attention_mask=q_mask, kv_cache=KVCache(keys, values, mask), steering=steering,
                logits_positions=(lengths - 1)[:, None], return_kv=True)
  rows = lambda x: jnp.broadcast_to(x, x.shape[:1] + (B,) + x.shape[2:])
  grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
  keys = jnp.concatenate([rows(keys), grow(out.kv_cache.keys)], axis=2)
  values = jnp.concatenate([rows(values), grow(out.kv_cache.values)], axis=2)
  mask = jnp.concatenate([jnp.broadcast_to(mask, (B, mask.shape[1])), q_mask,
                          jnp.zeros((B, max_new_tokens), bool)], axis=1)
  first = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
  generated = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
  return (jnp.int32(1), keys, values, mask, generated, jnp.isin(first, eos_ids),
          start + lengths)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(2,))
def _continue_rows(params: Params, config: ModelConfig, state, steering, eos_ids, stop_at):
  """Greedy steps until `stop_at` tokens are generated or every row has emitted an eos.

  state: (t generated so far, keys, values, mask, generated int32[B, max_new], done bool[B],
  position int32[B] of each row's first generated token); generated token t - 1 goes to cache
  slot `slots - max_new + t - 1`. steering: None or [layers, heads, head_dim].
  """

  def cond(state):
    t, *_, done, _ = state
    return (t < stop_at) & ~jnp.all(done)

  def step(state):
    t, keys, values, mask, generated, done, first_position = state
    B, max_new = generated.shape
    slot = keys.shape[2] - max_new + t - 1
    token = jax.lax.dynamic_slice_in_dim(generated, t - 1, 1, axis=1)
    out = forward(params, config, token, (first_position + t - 1)[:, None],
                  kv_cache=KVCache(keys, values, mask), steering=steering, return_kv=True)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, out.kv_cache.keys, slot, axis=2)
    values = jax.lax.dynamic_update_slice_in_dim(values, out.kv_cache.values, slot, axis=2)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((B, 1), bool), slot, axis=1)
    token = jnp.where(done, 0, jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32))
    generated = jax.lax.dynamic_update_slice_in_dim(generated, token[:, None], t, axis=1)
    return (t + 1, keys, values, mask, generated, done | jnp.isin(token, eos_ids),
            first_position)

  return jax.lax.while_loop(cond, step, state)


def generate_answers(engine, contexts: Sequence[np.ndarray], items: np.ndarray, *,
                     steering=None, max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
                     chunk_tokens: int = 1, batch_rows: int | None = None,
                     eos_ids: Sequence[int] | None = None) -> GeneratedAnswers:
  """Greedy answers to every item after every context, parsed as the reference does.

  Args:
    engine: an `Engine` (its model, tokenizer, question tokens and batch sizes).
    contexts: token ids from `engine.context_tokens(system)`, one per subject or prompt.
    items: 0-based item indices asked after every context.
    steering: None, or `f32[len(contexts), layers, heads, head_dim]` (one delta per context,
      applied to its context, questions and generated tokens; zeros = unsteered).
    max_new_tokens: the most tokens generated per row (the reference's 15).
    chunk_tokens: tokens generated between checks of the rows' texts: a batch stops as soon
      as every row's option is settled, i.e. no further text could change what
      `parse_option` reads (the letter and the character after it are there, or the
      reference's 12-character window is full, or the row emitted end-of-turn). Settled rows
      of an unfinished batch run on with it (fixed shapes: one compiled program), so a text
      may go past its settling point; a row is never cut before it. A check costs a transfer
      of the batch's token ids; a step, a pass over every row's cache.
    batch_rows: rows (items of one context) per compiled call (default
      `engine.question_batch`); each holds its own copy of the context's keys/values.
    eos_ids: tokens that end a reply (default the tokenizer's eos).
  Returns:
    `GeneratedAnswers`: answers `int[len(contexts), len(items)]` (0 = unparsable, counted,
    never dropped), the generated texts and token/time counts.
  """
  start_time = time.perf_counter()
  params, config = engine.model.params, engine.config
  tokenizer = engine.model.tokenizer
  contexts = scoring._check_sequences(contexts, config, "contexts")
  items = np.asarray(items, np.int64).reshape(-1)
  if len(items) == 0:
    raise UserInputError("generate_answers: no items given")
  if max_new_tokens < 1 or chunk_tokens < 1:
    raise UserInputError(f"generate_answers: max_new_tokens ({max_new_tokens}) and "
                         f"chunk_tokens ({chunk_tokens}) must be >= 1")
  if steering is not None:
    scoring._check_steering(steering, config, [(len(contexts),)], "generate_answers")
    steering = jnp.asarray(steering, jnp.float32)
  if eos_ids is None:
    eos_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
  eos = set(int(i) for i in eos_ids)
  eos_device = jnp.asarray(sorted(eos) or [-1], jnp.int32)
  batch_rows = int(batch_rows or engine.question_batch)
  questions = engine.question_tokens(items)
  q_bucket = scoring.bucket_length(max(map(len, questions)))
  batches = [scoring._pad(questions[begin:begin + batch_rows], q_bucket, batch_rows)
             for begin in range(0, len(items), batch_rows)]

  answers = np.zeros((len(contexts), len(items)), np.int64)
  texts = [[""] * len(items) for _ in contexts]
  generated_tokens = 0
  prompt_tokens = sum(map(len, contexts)) + len(contexts) * sum(map(len, questions))
  plan = scoring.plan_prefix_batches([len(c) for c in contexts],
                                     engine.prefix_batch(max(map(len, contexts))))
  for group, bucket in plan:
    tokens, lengths = scoring._pad([contexts[c] for c in group], bucket)
    group_steering = None if steering is None else steering[jnp.asarray(group)]
    cache = scoring.encode_prefixes(params, config, jnp.asarray(tokens), jnp.asarray(lengths),
                                    group_steering)
    for p, c in enumerate(group):
      row_steering = None if steering is None else steering[int(c)]
      for b, (q_tokens, q_lengths) in enumerate(batches):
        rows = range(b * batch_rows, min((b + 1) * batch_rows, len(items)))
        state = _start_rows(params, config, cache, jnp.asarray(lengths), jnp.int32(p),
                            jnp.asarray(q_tokens), jnp.asarray(q_lengths), group_steering,
                            eos_device, max_new_tokens=max_new_tokens)
        t = 1
        while True:
          out = np.asarray(state[4][:len(rows), :t])
          parsed = [_read_row(tokenizer, ids, eos, t == max_new_tokens) for ids in out]
          if t == max_new_tokens or all(settled for _, settled, _, _ in parsed):
            break
          state = _continue_rows(params, config, state, row_steering, eos_device,
                                 min(t + chunk_tokens, max_new_tokens))
          t = int(state[0])
        for i, (answer, _, text, n) in zip(rows, parsed, strict=True):
          answers[c, i], texts[c][i] = answer, text
          generated_tokens += n
  return GeneratedAnswers(answers=answers, texts=texts, generated_tokens=generated_tokens,
                          prompt_tokens=prompt_tokens, seconds=time.perf_counter() - start_time)


def _read_row(tokenizer, ids: np.ndarray, eos: set[int], at_limit: bool
              ) -> tuple[int, bool, str, int]:
  """(answer, settled, text, tokens generated) of one row's tokens so far."""
  ended = next((k for k, token in enumerate(ids.tolist()) if token in eos), None)
  kept = ids if ended is None else ids[:ended]
  text = tokenizer.decode(kept.tolist(), skip_special_tokens=True)
  answer, settled = _parse(prompts.ANSWER_PREFILL + text, complete=ended is not None)
  generated = len(ids) if ended is None else ended + 1
  return answer, settled or ended is not None or at_limit, text, generated


def agreement(generated: np.ndarray, letter_log_probs: np.ndarray) -> dict:
  """How often the generated answers equal the argmax-letter answers of the same rows.

  generated: `int[...]` answers (0 = unparsable); letter_log_probs: `[..., 5]` (letters A..E,
  e.g. `Engine.score`). -> rows, agree (count), agreement (share of all rows, an unparsable
  answer counted as disagreeing), agreement_parsed (share of parsed rows; NaN if none),
  unparsable (count).
  """
  generated = np.asarray(generated)
  letters = readout.answers(letter_log_probs, "argmax")
  if generated.shape != letters.shape:
    raise UserInputError(f"agreement: generated answers have shape {generated.shape}, the "
                         f"letter scores {np.shape(letter_log_probs)} (expected [..., 5] for it)")
  parsed = generated > 0
  agree = int((generated == letters).sum())
  return {"rows": int(generated.size), "agree": agree,
          "agreement": agree / generated.size if generated.size else float("nan"),
          "agreement_parsed": agree / int(parsed.sum()) if parsed.any() else float("nan"),
          "unparsable": int((~parsed).sum())}
