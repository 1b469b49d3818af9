"""The PAS alpha search for a batch of subjects, with honest alpha selection.

For every subject in the batch and every candidate alpha, the held-out items are
scored once with the subject's few-shot context and steering `alpha * sigma *
direction` (probes fitted on all 120 known items). From that one sweep:

* `few_shot` is the alpha = 0 row (PAS without steering is the few-shot prompt);
* `pas` uses the alpha chosen **without the test items**: k-fold over the
  120 known items (folds stratified by trait and shared by all subjects). For
  each fold, probes are refitted and the context rebuilt from the other folds'
  answers only, the fold's items are scored for every alpha, and the alpha
  with the lowest error summed over folds wins (ties go to the smaller alpha);
* `pas_oracle_test` is the reference's protocol: the alpha with the lowest
  error *on the held-out test items themselves*. It is optimistic by
  construction and is always labelled as such.

Each decoding (`argmax`, the paper's answer; `median`, the minimiser of the
expected absolute error) selects its own alpha.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from palign_jax import data, prompts
from palign_jax.pas import directions as pas_directions

DECODINGS = ("argmax", "median")


@dataclasses.dataclass(frozen=True)
class PasSettings:
  """PAS hyper-parameters (the reference's values by default)."""

  top_k: float = 24  # heads kept: an int count, or a fraction of all heads if < 1
  alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
  folds: int = 3  # k of the honest k-fold alpha selection over the known items
  seed: int = 0


# (systems [P], item indices [n], steering [P, L, H, D] | None) -> log-probs [P, n, 5]
ScoreFn = Callable[[list[str], np.ndarray, np.ndarray | None], np.ndarray]


def fold_of_known_items(folds: int, seed: int) -> np.ndarray:
  """`int[120]`: the fold of each known item, stratified by trait, the same for all subjects."""
  split, items = data.load_split(), data.load_items()
  traits = items.trait[split.known]
  rng = np.random.default_rng(seed)
  fold = np.empty(len(traits), np.int64)
  for t in range(len(data.TRAITS)):
    members = rng.permutation(np.flatnonzero(traits == t))
    fold[members] = np.arange(len(members)) % folds
  return fold


@dataclasses.dataclass
class PasSweep:
  """Everything the search produced for a batch of subjects."""

  fit: pas_directions.PasFit  # probes/directions/sigma fitted on all 120 known items
  test_log_probs: np.ndarray  # f32[subjects, alphas, heldout, 5]
  validation_error: dict[str, np.ndarray]  # decoding -> f32[subjects, alphas] (k-fold)
  alphas: np.ndarray  # f32[alphas]
  heldout: np.ndarray  # int[heldout]: the 0-based items of test_log_probs

  def chosen_alpha_index(self, decoding: str) -> np.ndarray:
    """`int[subjects]`: the honest choice (first minimum of the k-fold error)."""
    return np.argmin(self.validation_error[decoding], axis=1)

  def predictions(self, decoding: str) -> np.ndarray:
    """`int[subjects, alphas, heldout]` answers 1..5 for every alpha."""
    return prompts.letter_probabilities_to_answers(self.test_log_probs, decoding)


def _few_shot_systems(known: np.ndarray) -> list[str]:
  return [prompts.few_shot_system_prompt(row) for row in known]


def _steered_scores(score: ScoreFn, known: np.ndarray, fit: pas_directions.PasFit,
                    alphas: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Scores `items` for every (subject, alpha): `[subjects, alphas, items, 5]`."""
  steering = np.asarray(pas_directions.steering_vectors(fit, alphas))  # [S, A, L, H, D]
  subjects = len(known)
  systems = [s for s in _few_shot_systems(known) for _ in alphas]
  flat = steering.reshape((subjects * len(alphas),) + steering.shape[2:])
  log_probs = score(systems, items, flat)
  return log_probs.reshape(subjects, len(alphas), len(items), -1)


def subject_seeds(subject_ids: Sequence[str]) -> np.ndarray:
  """`int32[subjects]`: a stable per-subject seed, so a subject's probe split does not
  depend on which other subjects share its batch."""
  return np.array([zlib.crc32(str(s).encode()) & 0x7FFFFFFF for s in subject_ids], np.int32)


def _top_k(top_k: float) -> int | float:
  """A count when >= 1 (configs may carry it as a float), else a fraction of all heads."""
  return int(top_k) if top_k >= 1 else float(top_k)


def _fit(activations, known: np.ndarray, settings: PasSettings, salt: int,
         seeds: np.ndarray) -> pas_directions.PasFit:
  key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), salt)
  return pas_directions.fit_pas(activations, known, key=key, top_k=_top_k(settings.top_k),
                                subject_ids=seeds)


def run_sweep(score: ScoreFn, activations: np.ndarray, known: np.ndarray,
              settings: PasSettings, *, subject_ids: Sequence[str] | None = None,
              heldout: np.ndarray | None = None,
              with_selection: bool = True, progress: Callable[[str], None] | None = None
              ) -> PasSweep:
  """Fits PAS for a batch of subjects and scores every alpha on the held-out items.

  Args:
    score: the model's scoring function (see `ScoreFn`).
    activations: `f32[120, 2, layers, heads, head_dim]` shared head outputs.
    known: `int[subjects, 120]` answers to the known items (short-form order).
    subject_ids: ids seeding each subject's probe split (default: batch positions).
    heldout: 0-based item indices to predict; the benchmark's 180 by default.
    with_selection: run the honest k-fold selection (skip it for oracle-only runs).
  """
  progress = progress or (lambda _: None)
  split = data.load_split()
  heldout = split.heldout if heldout is None else heldout
  alphas = np.asarray(settings.alphas, np.float32)
  seeds = subject_seeds(subject_ids if subject_ids is not None else range(len(known)))
  fit = _fit(activations, known, settings, salt=0, seeds=seeds)
  if len(heldout):
    progress("alpha sweep on held-out items")
    test_log_probs = _steered_scores(score, known, fit, alphas, heldout)
  else:  # nothing to predict (e.g. a user's own answers): only the alpha selection runs
    test_log_probs = np.zeros((len(known), len(alphas), 0, len(prompts.OPTION_LETTERS)))
  validation_error = {d: np.zeros((len(known), len(alphas))) for d in DECODINGS}
  if with_selection:
    fold = fold_of_known_items(settings.folds, settings.seed)
    totals = {d: np.zeros((len(known), len(alphas))) for d in DECODINGS}
    counts = np.zeros((len(known), 1))
    for f in range(settings.folds):
      progress(f"honest alpha selection, fold {f + 1}/{settings.folds}")
      in_fold = fold == f
      visible = np.where(in_fold[None, :], 0, known)
      fold_fit = _fit(activations, visible, settings, salt=f + 1, seeds=seeds)
      log_probs = _steered_scores(score, visible, fold_fit, alphas, split.known[in_fold])
      actual = known[:, in_fold][:, None, :]
      answered = actual > 0
      for d in DECODINGS:
        predicted = prompts.letter_probabilities_to_answers(log_probs, d)
        totals[d] += np.where(answered, np.abs(predicted - actual), 0).sum(-1)
      counts += answered[:, 0].sum(-1, keepdims=True)
    validation_error = {d: totals[d] / np.maximum(counts, 1) for d in DECODINGS}
  return PasSweep(fit=fit, test_log_probs=test_log_probs, validation_error=validation_error,
                  alphas=alphas, heldout=np.asarray(heldout))
