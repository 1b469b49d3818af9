"""The DPO baseline under the PAPI protocol: pairs from known answers, honest stopping, scoring.

For a batch of subjects, `align_subjects`:

1. builds each subject's preference pairs from their 120 known answers (`preference_pairs`):
   the prompt is the PAPI question under the default system prompt; the chosen completion is
   the whole assistant answer with the subject's option ("Option (B). Moderately Accurate" and
   the end-of-turn token); the rejected one is, by default (`far_end`), the option at the other
   end of the scale (answers 4 and 5 reject 1, answers 1 and 2 reject 5; a neutral 3 has no
   other end and gives no pair). `all_others` pairs the answer with each of the other four.
2. trains one LoRA adapter per (subject, fold, learning rate) row in one vmapped program
   (`palign_jax.dpo.train`), all rows sharing the frozen base model as policy and reference:
   for each of k folds of the known items (`alignment.fold_of_known_items`, the folds PAS
   uses) a row trained on the other folds' pairs, and a final row trained on all of them.
   Snapshots are kept at 0, eval_every, ..., max_steps steps. On the engine's mesh the rows
   are split over its `data` axis; the program's shapes (pairs per row, rows per batch) are
   fixed by the rule and the batch size, not by the subjects' answers, so batches reuse it.
3. chooses the number of steps (and the learning rate, if several are given) on the known
   items only, by the same rules as PAS's alpha (`selection`): each fold row's snapshots
   score the fold's items (`engine.score` under the default system prompt, with the
   content-free questions); the readout is chosen at step 0, then the fewest steps whose
   out-of-fold benchmark error is within one standard error of the best admissible candidate
   (letter mass not far below the base model's); at equal steps the smaller learning rate
   comes first (less change). Step 0 is the base model, so a subject whom
   DPO does not help on their own known items gets the zero-shot model, as PAS can pick
   alpha 0. The 180 test items are never seen before this choice is made.
4. scores the test items with the final row's snapshot at the chosen steps.

A subject with no usable pairs (every known answer neutral or missing) is not trained; their
result is the base model's, with a note. A row whose loss or update is not finite stops with
the other rows of its (subject, learning rate), with a note; step counts from that step on are
not candidates at that rate, and the subject's other rates and the other subjects train on as
if it were not there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax import data, prompts, readout
from palign_jax.dpo import lora
from palign_jax.dpo import train as dpo_train
from palign_jax.errors import UserInputError
from palign_jax.protocol import alignment
from palign_jax.protocol import selection as selection_lib

REJECTED_RULES = ("far_end", "all_others")
PAIRS_PER_ITEM = {"far_end": 1, "all_others": 4}  # the most pairs one answered item gives
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DpoSettings:
  """Everything the DPO protocol needs from a run config (`config.dpo`, `config.pas.folds`,
  `config.readout`, `config.seed`)."""

  beta: float
  rank: int
  lora_alpha: float
  targets: tuple[str, ...]
  learning_rates: tuple[float, ...]
  max_steps: int
  eval_every: int
  pairs_per_step: int
  rejected: str  # one of REJECTED_RULES
  seed: int
  folds: int
  decodings: tuple[str, ...]
  choice: str  # "kfold" or one decoding (as `alignment.AlignSettings.choice`)
  selection: selection_lib.SelectionSettings

  @classmethod
  def from_config(cls, config) -> DpoSettings:
    d = config.dpo
    try:
      targets = lora.parse_targets(str(d.targets))
    except ValueError as err:
      raise UserInputError(f"config.dpo.targets: {err}") from None
    rates = tuple(float(r) for r in (d.learning_rates if isinstance(d.learning_rates, (
        list, tuple)) else [d.learning_rates]))
    checks = [
        (float(d.beta) > 0, f"config.dpo.beta: {d.beta} must be > 0"),
        (int(d.rank) >= 1, f"config.dpo.rank: {d.rank} must be >= 1"),
        (float(d.lora_alpha) > 0, f"config.dpo.lora_alpha: {d.lora_alpha} must be > 0"),
        (bool(rates) and all(r > 0 for r in rates),
         f"config.dpo.learning_rates: {rates} must be one or more positive rates"),
        (int(d.eval_every) >= 1 and int(d.max_steps) >= int(d.eval_every)
         and int(d.max_steps) % int(d.eval_every) == 0,
         f"config.dpo.max_steps ({d.max_steps}) must be a positive multiple of "
         f"config.dpo.eval_every ({d.eval_every})"),
        (int(d.pairs_per_step) >= 1, f"config.dpo.pairs_per_step: {d.pairs_per_step} must be "
         ">= 1"),
        (str(d.rejected) in REJECTED_RULES, f"config.dpo.rejected: {d.rejected!r} is not one of "
         f"{REJECTED_RULES}"),
        (int(config.pas.folds) >= 2, f"config.pas.folds: {config.pas.folds} folds leave nothing "
         "to validate the number of DPO steps on; use 2 or more"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserInputError(message)
    decodings, choice = alignment.readout_settings(config)
    seed = config.seed if d.get("seed") is None else d.seed
    return cls(beta=float(d.beta), rank=int(d.rank), lora_alpha=float(d.lora_alpha),
               targets=targets, learning_rates=rates, max_steps=int(d.max_steps),
               eval_every=int(d.eval_every), pairs_per_step=int(d.pairs_per_step),
               rejected=str(d.rejected), seed=int(seed), folds=int(config.pas.folds),
               decodings=decodings, choice=choice,
               selection=selection_lib.SelectionSettings.from_config(config))

  @property
  def train_settings(self) -> dpo_train.TrainSettings:
    return dpo_train.TrainSettings(
        beta=self.beta, lora_scale=lora.lora_scale(self.lora_alpha, self.rank),
        max_steps=self.max_steps, eval_every=self.eval_every,
        pairs_per_step=self.pairs_per_step)

  @property
  def candidate_steps(self) -> np.ndarray:
    """`int[C]`: 0, eval_every, ..., max_steps."""
    return self.train_settings.candidate_steps


@dataclasses.dataclass
class SubjectDpo:
  """One subject's DPO baseline: the adapter, how its number of steps was chosen on the known
  items, and the test items' letter log-probabilities under it.

  Read it like `alignment.SubjectAlignment`'s PAS row: `decoded(decoding)` gives the test
  answers in any readout; `chosen_decoding` is the headline row's readout. `test_log_probs`,
  `test_prior` and `known_log_probs` are exactly what `records.log_probs_record` takes
  (`log_probs`, `prior`, `known_log_probs`). `adapters` is what `engine.score(...,
  adapters=)` and `llama.forward(..., adapters=)` take (add a leading axis for `score`).
  """

  subject_id: str
  trained: bool  # False: no usable preference pairs, the base model stands in (see `note`)
  note: str | None  # skipped, training stopped (non-finite loss), folds without pairs
  num_pairs: int  # preference pairs from all 120 known items (`rejected_rule`)
  rejected_rule: str  # how the rejected option was picked (see REJECTED_RULES)
  candidate_steps: np.ndarray  # int[C]: the step counts considered (0 = the base model)
  learning_rates: np.ndarray  # f32[L]: the learning rates considered
  decodings: tuple[str, ...]  # the readouts scored
  fold_error: dict[str, np.ndarray]  # decoding -> f32[L, C] k-fold error on the known items;
  #   NaN where a step count was not a candidate (not trained: all but 0; a stop: from it on)
  chosen_steps: int  # the number of steps chosen on the known items (0: the base model)
  chosen_learning_rate: float  # with the steps (moot at 0 steps); NaN when not trained
  chosen_decoding: str  # the readout chosen with the steps: the headline row
  selection: dict  # how steps, rate and readout were chosen (`selection.Selection.record`)
  adapters: dict | None  # forward-form LoRA factors `{target: {"a": f32[layers, in, rank],
  #   "b": f32[layers, rank, out]}}` (scale folded into b), trained on all known pairs for
  #   `chosen_steps` steps (b = 0 when 0); None when not trained
  heldout: np.ndarray  # int[items]: the 0-based test items
  known_answers: np.ndarray  # int[120]: the subject's known answers (0 = missing)
  test_log_probs: np.ndarray  # f32[items, 5]: letters A..E under the full vocabulary
  test_prior: np.ndarray  # f32[5]: content-free letter prior of the same model and context
  known_log_probs: np.ndarray  # f32[120, 5]: known items scored by the fold adapters that did
  #   not train on them (out of fold), at the chosen steps and rate (`matched` readout)
  loss: np.ndarray  # f32[L, max_steps]: the final (all-pairs) training's loss per step
  work: dict  # what was computed and seconds per stage (batch totals)

  def decoded(self, decoding: str) -> tuple[np.ndarray, str | None]:
    """`(int[items] answers 1..5 on the test items, fallback note)` in readout `decoding`."""
    return readout.decode(self.test_log_probs, decoding, prior=self.test_prior,
                          match=(self.known_log_probs, self.known_answers))

  def predictions(self, decoding: str | None = None) -> np.ndarray:
    """`int[items]` answers 1..5 on the test items (default: the chosen decoding)."""
    return self.decoded(decoding or self.chosen_decoding)[0]


# --- preference pairs ---------------------------------------------------------------------------

def answer_text(letter: str) -> str:
  """The assistant's whole answer for an option letter, e.g. "Option (B). Moderately Accurate":
  the answer prefill followed by the option exactly as the question lists it, so the trained
  answer and the scored letter can never drift apart."""
  for line in prompts.QUESTION_TEMPLATE.splitlines():
    if line.startswith(f"({letter}).") and prompts.ANSWER_PREFILL.endswith("("):
      return prompts.ANSWER_PREFILL + line[1:]
  raise UserInputError(f"prompts: no option line for letter {letter!r} in the question "
                       "template to build the DPO answer from")


def _letter(value: int) -> int:
  """Answer value 1..5 -> option index 0..4 (A..E, the readout's order)."""
  return prompts.OPTION_LETTERS.index(data.ANSWER_LETTERS[int(value)])


def preference_pairs(known_answers: np.ndarray, rule: str = "far_end"
                     ) -> list[tuple[int, int, int]]:
  """`(known item index 0..119, chosen option, rejected option)` per pair; options 0..4 = A..E.

  far_end: one pair per answered item other than 3, rejecting the end of the scale farthest
    from the answer (5 and 4 reject 1; 1 and 2 reject 5). It keeps the answer's direction
    (agree or not), the information PAS's probes use too, as one pair per item, so each item
    weighs the same and no pair asks the model to prefer 4 over 5 as strongly as 4 over 1.
  all_others: four pairs per answered item, the answer over each other option (a 3 too).
  """
  if rule not in REJECTED_RULES:
    raise UserInputError(f"rejected rule {rule!r} is not one of {REJECTED_RULES}")
  pairs = []
  for i, value in enumerate(np.asarray(known_answers)):
    value = int(value)
    if value == 0:
      continue
    if rule == "far_end":
      if value != 3:
        pairs.append((i, _letter(value), _letter(1 if value > 3 else 5)))
    else:
      pairs.extend((i, _letter(value), _letter(other)) for other in range(1, 6) if other != value)
  return pairs


def pair_width(rule: str, pref: dpo_train.PreferenceData) -> int:
  """The most pairs any subject can have under `rule` (every known item answered): the fixed
  `RowPairs` width of a run, so that it does not follow the batch's answers."""
  return PAIRS_PER_ITEM[rule] * int(pref.prompts.shape[0])


_DATA_CACHE: dict[str, dpo_train.PreferenceData] = {}


def preference_data(engine) -> dpo_train.PreferenceData:
  """Token tables of the 120 known items' prompts (default system prompt, PAPI question,
  assistant header) and of the five answers to each (answer text + end-of-turn token).
  Built once per model."""
  key = f"{engine.fingerprint}-{prompts.PROMPT_VERSION}"
  if key not in _DATA_CACHE:
    tokenizer, system = engine.model.tokenizer, prompts.DEFAULT_SYSTEM_PROMPT
    texts = data.load_items().text
    prompt_ids, completions = [], []
    for j in data.load_split().known:
      question = prompts.question(texts[j])
      prompt = prompts.encode_chat_prompt(tokenizer, system, question)
      prompt_ids.append(prompt)
      completions.append([_completion(tokenizer, prompt, system, question, answer_text(letter))
                          for letter in prompts.OPTION_LETTERS])
    _DATA_CACHE[key] = dpo_train.PreferenceData.build(prompt_ids, completions)
  return _DATA_CACHE[key]


def _completion(tokenizer, prompt: list[int], system: str, question: str,
                answer: str) -> list[int]:
  """The answer's tokens after `prompt`, through the end-of-turn token the template closes the
  assistant turn with."""
  opened = prompts.encode_conversation(tokenizer, system, question, answer)
  opened = opened.prefix + opened.suffix
  messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
              {"role": "assistant", "content": answer}]
  closed = prompts._ids(tokenizer, prompts._render(tokenizer, messages, continue_final=False))
  if (opened[:len(prompt)] != prompt or closed[:len(opened)] != opened
      or len(closed) <= len(opened)):
    raise UserInputError("tokenizer: the chat template does not render an answered question as "
                         "the question's prompt followed by the answer and an end-of-turn "
                         "token; DPO pairs cannot be built for this model")
  return closed[len(prompt):len(opened) + 1]


# --- the protocol -------------------------------------------------------------------------------

def _row_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) & 0x7FFFFFFF for p in parts]).generate_state(1)[0])


def _candidates(learning_rates, num_steps: int) -> list[tuple[int, int]]:
  """`(learning-rate index, step index)` in selection order, least change first (as
  `selection` takes them: the first candidate within the bar wins, so this order is the
  tie-break): step 0 (the base model, the same for every rate), then fewer steps before more
  and, at the same steps, the smaller rate before the larger (equal rates: config order)."""
  by_rate = np.argsort(np.asarray(learning_rates, np.float64), kind="stable")
  return [(0, 0)] + [(int(lr), c) for c in range(1, num_steps) for lr in by_rate]


def _select(known_log_probs, fold_prior, known, fold, settings: DpoSettings, usable,
            learning_rates, steps) -> tuple[selection_lib.Selection, dict[str, np.ndarray],
                                            list[tuple[int, int]], list]:
  """One subject's choice of (steps, rate, readout) by `selection` on the known items.

  known_log_probs `[L, C, 120, 5]` (out of fold), fold_prior `[folds, L, C, 5]`, known
  `int[120]`, usable `bool[L, C]` (False: that rate's training had stopped before those
  steps). Returns the selection, the errors as `[L, C]` per decoding, the candidates and
  their labels."""
  candidates = _candidates(learning_rates, known_log_probs.shape[1])
  rows, cols = np.array(candidates).T
  pick, _ = selection_lib.select(
      known_log_probs[rows, cols], fold_prior[:, rows, cols], known, fold, settings.decodings,
      settings.choice, settings.selection, usable=usable[rows, cols])
  grid = {}
  for d, e in pick.errors.items():
    grid[d] = np.full(known_log_probs.shape[:2], np.nan)
    grid[d][rows, cols] = e
    grid[d][:, 0] = e[0]
  labels = [int(steps[c]) if len(learning_rates) == 1
            else f"{int(steps[c])} steps at lr {learning_rates[lr]:g}" for lr, c in candidates]
  return pick, grid, candidates, labels


def align_subjects(engine, subjects: data.Subjects, settings: DpoSettings, *,
                   heldout: np.ndarray | None = None,
                   progress: Callable[[str], None] | None = None) -> list[SubjectDpo]:
  """The DPO baseline for a batch of subjects (see the module docstring).

  Args:
    engine: a `palign_jax.engine.Engine` (model, tokenizer, scoring).
    subjects: the batch; only their 120 known answers are read.
    settings: `DpoSettings.from_config(config)`.
    heldout: the test items (default: the benchmark's 180); may be empty (a user's own answers).
    progress: called with a short label as each stage starts.
  Returns one `SubjectDpo` per subject, in order.
  """
  stages = alignment._Stages(progress or (lambda _: None))
  split = data.load_split()
  heldout = split.heldout if heldout is None else np.asarray(heldout)
  known = data.known_answers(subjects).astype(np.int32)
  params, config = engine.model.params, engine.config
  steps = settings.candidate_steps
  n, L, C, k = len(known), len(settings.learning_rates), len(steps), settings.folds
  fold = alignment.fold_of_known_items(k, settings.seed)
  context = engine.context_tokens(prompts.DEFAULT_SYSTEM_PROMPT)
  seeds = alignment.subject_seeds(subjects.ids)

  pairs = [preference_pairs(row, settings.rejected) for row in known]
  trained = [s for s in range(n) if pairs[s]]
  notes: list[list[str]] = [[] for _ in range(n)]
  for s in set(range(n)) - set(trained):
    notes[s].append(f"skipped: no usable preference pairs under the {settings.rejected!r} rule "
                    "(every known answer neutral or missing); the base model stands in")
    _LOG.warning("DPO: subject %s %s", subjects.ids[s], notes[s][-1])

  pref = stages.run("pairs", "DPO: preference pairs as token ids", preference_data, engine)
  base_scores, base_prior = stages.run(
      "base_sweep", "DPO: the base model on the known and test items", engine.score,
      [context], np.concatenate([split.known, heldout]), content_free=True)
  base_known, base_test = base_scores[0, :len(split.known)], base_scores[0, len(split.known):]
  base_prior = base_prior[0]

  # Rows: (trained subject, fold f < k or f = k for all known items, learning rate).
  rows = [(s, f, lr) for s in trained for f in range(k + 1) for lr in range(L)]
  row_of = {key: r for r, key in enumerate(rows)}
  names = [f"subject {subjects.ids[s]} " + (f"fold {f + 1}" if f < k else "all items")
           + (f" lr {settings.learning_rates[lr]:g}" if L > 1 else "") for s, f, lr in rows]
  result = None
  if rows:
    reference = stages.run("reference", "DPO: reference log-probabilities",
                           dpo_train.reference_log_probs, params, config, pref)
    # The width fits any subject's answers (every item answered), so it is the same for
    # every batch of the run and the training program compiles once.
    row_pairs = dpo_train.RowPairs.build(
        [[p for p in pairs[s] if f == k or fold[p[0]] != f] for s, f, _ in rows],
        width=pair_width(settings.rejected, pref))
    for s in trained:
      empty = [f + 1 for f in range(k) if row_pairs.count[row_of[(s, f, 0)]] == 0]
      if empty:
        notes[s].append(f"fold(s) {empty}: no preference pairs outside the fold; those fold "
                        "rows stayed at the base model")
    # One initial adapter per subject, shared by its fold and final rows, so the rows that
    # choose the number of steps start where the final one does.
    base_key = jax.random.PRNGKey(settings.seed)
    init_keys = jnp.stack([jax.random.fold_in(base_key, seeds[s]) for s, _, _ in rows])
    init = jax.jit(jax.vmap(lambda key: lora.init_adapters(
        key, config, rank=settings.rank, targets=settings.targets)))(init_keys)
    result = stages.run(
        "train", f"DPO: training {len(rows)} adapters ({len(trained)} subjects x {k + 1} x "
        f"{L} rates), {settings.max_steps} steps", dpo_train.train, params, config, pref,
        reference, row_pairs, init, settings.train_settings,
        learning_rates=[settings.learning_rates[lr] for _, _, lr in rows],
        seeds=[_row_seed(settings.seed, seeds[s], f, lr) for s, f, lr in rows],
        groups=[row_of[(s, 0, lr)] for s, _, lr in rows], row_names=names,
        mesh=engine.mesh, rows=n * (k + 1) * L)

  # Out-of-fold scores of the known items at every (rate, steps); step 0 is the base model.
  known_log_probs = np.broadcast_to(base_known, (n, L, C) + base_known.shape).copy()
  fold_prior = np.broadcast_to(base_prior, (n, k, L, C, 5)).copy()
  if rows:
    fold_rows = np.array([[row_of[(s, f, lr)] for s in trained for lr in range(L)]
                          for f in range(k)])  # [k, trained x L]
    for f in range(k):
      in_fold = fold == f
      adapters = jax.tree.map(lambda x, r=fold_rows[f]: x[r, 1:].reshape((-1,) + x.shape[2:]),
                              result.snapshots)  # [trained x L x (C - 1), ...]
      log_probs, prior = stages.run(
          "fold_sweep", f"DPO fold {f + 1}/{k}: {fold_rows.shape[1] * (C - 1)} adapters x "
          f"{int(in_fold.sum())} items", engine.score,
          [context] * (fold_rows.shape[1] * (C - 1)), split.known[in_fold], content_free=True,
          adapters=adapters)
      fill = np.ix_(trained, range(L), range(1, C), np.flatnonzero(in_fold))
      known_log_probs[fill] = log_probs.reshape(len(trained), L, C - 1, -1, 5)
      fold_prior[trained, f, :, 1:] = prior.reshape(len(trained), L, C - 1, 5)

  # The choice, on the known items only. Step counts a subject could not use are NaN: every
  # step after 0 for a subject not trained, and at a rate whose rows stopped, those from the
  # stop on.
  fold_error, choices, selections = [], [], []
  for s in range(n):
    usable = np.broadcast_to(steps == 0 if s not in trained else np.ones(C, bool), (L, C)).copy()
    for lr in range(L):
      own = [r for r in range(len(rows)) if rows[r][0] == s and rows[r][2] == lr
             and result.stopped_at[r] >= 0]
      if not own:
        continue
      t = int(min(result.stopped_at[r] for r in own))
      usable[lr] = (steps < t) | (steps == 0)
      failed = [names[r] for r in own if not result.stopped_by_group[r]]
      rate = f" at learning rate {settings.learning_rates[lr]:g}" if L > 1 else ""
      notes[s].append(f"training{rate} stopped at step {t + 1} of {settings.max_steps}: the DPO "
                      f"loss or update of {', '.join(failed)} was not finite; every row of this "
                      f"subject{rate} stopped there and step counts >= {t} (other than 0, the "
                      f"base model) were not candidates{rate}; the other "
                      f"{'rates and ' if L > 1 else ''}subjects went on")
      _LOG.warning("DPO: subject %s: %s", subjects.ids[s], notes[s][-1])
    pick, errors, candidates, labels = _select(
        known_log_probs[s], fold_prior[s], known[s], fold, settings, usable,
        settings.learning_rates, steps)
    fold_error.append(errors)
    lr, c = candidates[pick.index]
    choices.append((pick.decoding, lr, c))
    selections.append(pick.record(labels))

  # The test items, with the final rows' snapshots at the chosen steps (0: the base model).
  scored = [s for s in trained if choices[s][2] > 0]
  test_log_probs, test_prior = [base_test] * n, [base_prior] * n
  if scored and len(heldout):
    pick_rows = np.array([row_of[(s, k, choices[s][1])] for s in scored])
    pick_steps = np.array([choices[s][2] for s in scored])
    adapters = jax.tree.map(lambda x: x[pick_rows, pick_steps], result.snapshots)
    log_probs, prior = stages.run(
        "test_sweep", f"DPO test items: {len(scored)} adapters x {len(heldout)} items",
        engine.score, [context] * len(scored), heldout, content_free=True, adapters=adapters)
    for i, s in enumerate(scored):
      test_log_probs[s], test_prior[s] = log_probs[i], prior[i]

  work = {"subjects_in_batch": n, "trained_subjects": len(trained), "rows": len(rows),
          "folds": k, "candidate_steps": [int(x) for x in steps],
          "learning_rates": list(settings.learning_rates),
          "pairs_per_step": settings.pairs_per_step, "beta": settings.beta,
          "rank": settings.rank, "lora_alpha": settings.lora_alpha,
          "targets": list(settings.targets), "rejected_rule": settings.rejected,
          "train_shapes": {"prompt_tokens": int(pref.prompts.shape[1]),
                           "branch_tokens": int(pref.branches.shape[2]),
                           "pairs_per_row": pair_width(settings.rejected, pref),
                           "rows": n * (k + 1) * L, "data_shards": engine.data_shards},
          "content_free_questions": len(readout.CONTENT_FREE_STATEMENTS),
          "test_items": int(len(heldout)), "stage_seconds": dict(stages.seconds)}
  out = []
  for s, sid in enumerate(subjects.ids):
    decoding, lr, c = choices[s]
    adapters, loss = None, np.zeros((L, 0), np.float32)
    if s in trained:
      final = row_of[(s, k, lr)]
      adapters = lora.to_numpy(jax.tree.map(lambda x, r=final, c=c: x[r, c], result.snapshots))
      loss = np.stack([result.loss[row_of[(s, k, j)]] for j in range(L)])
    out.append(SubjectDpo(
        subject_id=sid, trained=s in trained, note="; ".join(notes[s]) or None,
        num_pairs=len(pairs[s]), rejected_rule=settings.rejected,
        candidate_steps=np.asarray(steps), learning_rates=np.asarray(settings.learning_rates,
                                                                    np.float32),
        decodings=settings.decodings, fold_error=fold_error[s], chosen_steps=int(steps[c]),
        chosen_learning_rate=(float(settings.learning_rates[lr]) if s in trained
                              else float("nan")),
        chosen_decoding=decoding, selection=selections[s], adapters=adapters, heldout=heldout,
        known_answers=known[s],
        test_log_probs=test_log_probs[s], test_prior=test_prior[s],
        known_log_probs=known_log_probs[s, lr, c], loss=loss, work=work))
  return out
