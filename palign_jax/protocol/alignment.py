"""PAS under the PAPI protocol: contexts, folds, honest alpha selection and the labelled oracle.

For a batch of subjects, `align_subjects`:

1. fits PAS on each subject's 120 known answers (probes, kept heads, directions, sigma);
2. `kfold_known` (honest): for each of k folds of the known items (stratified by trait, the
   same for all subjects), refits PAS and rebuilds the few-shot context from the other folds'
   answers only, scores the fold's items at every alpha, and lets `selection` choose, on
   those out-of-fold scores alone, the readout (at alpha 0) and then the alpha: the benchmark's
   metric, letter-mass admissibility, one standard error toward alpha 0; every readout's row
   then reads the test items at that one alpha;
3. scores the held-out items only where asked: alpha 0 (the few-shot row); for the honest
   `pas` row, the chosen alpha with the *fold fits* (cross-fitting: the k fits the alpha was
   validated on, their letter distributions averaged), because a fit on all 120 items steers
   harder per unit alpha than the fits on k-1 folds, so an alpha validated on the fold fits
   overshoots on the full fit (README, "How alpha is chosen", step 5); averaging, rather than
   letting each fold fit answer a share of the items, steers only where the fits agree; every
   alpha with the full fit when `oracle_test` is requested (the paper's deployment);
4. `oracle_test` (the reference's protocol, optimistic by construction): per decoding, the
   alpha with the lowest error on the held-out test items themselves;
5. `pas_probes` (a diagnostic, when the held-out items' head activations are given): the
   subject's own probes applied to the held-out items' A/E head outputs, averaged over the
   kept heads and read out to 1..5 by a quantile map fitted on the known items out of fold.
   No generation: it shows whether the person is linearly present in the heads.

It returns one `SubjectAlignment` per subject, which `launch.align`, `launch.evaluate` and the
alignment profiles all consume, and which says what was computed and how long each stage took.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from palign_jax import data, parallel, prompts, readout
from palign_jax import generated as generated_lib
from palign_jax.errors import UserInputError
from palign_jax.pas import fit as pas_fit
from palign_jax.pas import heads as pas_heads
from palign_jax.protocol import alpha_range, metric
from palign_jax.protocol import selection as selection_lib

SELECTIONS = ("kfold_known", "oracle_test")


@dataclasses.dataclass(frozen=True)
class AlignSettings:
  """Everything the protocol needs from a run config (`config.pas`, `config.probe`, seed)."""

  fit: pas_fit.FitSettings
  alphas: tuple[float, ...]  # sorted, distinct, including 0
  folds: int
  seed: int
  decodings: tuple[str, ...]  # readouts scored (see `readout`)
  choice: str  # "kfold" (decoding chosen per subject on the known items) or a fixed decoding
  selection: selection_lib.SelectionSettings
  generated: bool = False  # also the paper's generated readout at alpha 0 and the chosen alpha
  alpha_range: dict | None = None  # how a model-range grid was measured (`alpha_range`)

  @classmethod
  def from_config(cls, config, num_heads_total: int) -> AlignSettings:
    pas, probe = config.pas, config.probe
    top_k = pas_heads.resolve_top_k(pas.top_k, pas.top_k_fraction, num_heads_total,
                                    source="config.pas")
    alphas = tuple(sorted({float(a) for a in pas.alphas}))
    if 0.0 not in alphas or alphas[0] < 0:
      raise UserInputError(f"config.pas.alphas: {tuple(pas.alphas)} must include 0 (no "
                           "steering: the few-shot row, and a choice the selection can make) "
                           "and no negative alpha (it would steer away from the person)")
    if int(pas.folds) < 2:
      raise UserInputError(f"config.pas.folds: {pas.folds} folds leave nothing to validate on; "
                           "use 2 or more")
    decodings, choice = readout_settings(config)
    return cls(fit=pas_fit.FitSettings(
        top_k=top_k, c=float(probe.c), val_fraction=float(probe.val_fraction),
        split_by=str(probe.split_by), min_items=int(probe.min_items),
        max_iter=int(probe.max_iter), tol=float(probe.tol)),
        alphas=alphas, folds=int(pas.folds), seed=int(config.seed), decodings=decodings,
        choice=choice, selection=selection_lib.SelectionSettings.from_config(config),
        generated=bool(config.readout.generated))

  @classmethod
  def for_engine(cls, config, engine, progress: Callable[[str], None] | None = None
                 ) -> AlignSettings:
    """`from_config` with the alpha grid resolved for this model (`alpha_range`: the fixed
    grid, or the model's measured range, cached per model)."""
    settings = cls.from_config(config, engine.config.num_layers * engine.config.num_heads)
    alphas, record = alpha_range.resolve(engine, config, settings.fit, progress)
    return dataclasses.replace(settings, alphas=alphas, alpha_range=record)


def readout_settings(config) -> tuple[tuple[str, ...], str]:
  """`(decodings, choice)` from `config.readout`, checked: the readouts scored, and "kfold" or
  the one readout the headline rows use."""
  decodings = tuple(d.strip() for d in str(config.readout.decodings).split(",") if d.strip())
  unknown = [d for d in decodings if d not in readout.DECODINGS]
  if unknown or not decodings:
    raise UserInputError(f"config.readout.decodings: {unknown or decodings} is not a list of "
                         f"{', '.join(readout.DECODINGS)}")
  choice = str(config.readout.choice)
  if choice != "kfold" and choice not in decodings:
    raise UserInputError(f"config.readout.choice: {choice!r} is neither 'kfold' nor one of "
                         f"the decodings {decodings}")
  return decodings, choice


@dataclasses.dataclass
class SubjectAlignment:
  """One subject's PAS alignment and what it took to find it."""

  subject_id: str
  alphas: np.ndarray  # f32[A]: the candidate alphas
  valid: bool  # probes were fitted (enough labelled items of both classes)
  num_labelled: int  # labelled activation vectors (2 per item answered other than 3)
  head_mask: np.ndarray  # bool[layers, heads]: kept heads
  directions: np.ndarray  # f32[layers, heads, head_dim]: unit mass-mean directions
  sigma: np.ndarray  # f32[layers, heads]
  heldout: np.ndarray  # int[items]: the 0-based test items
  known_answers: np.ndarray  # int[120]: the subject's known answers (0 = missing)
  decodings: tuple[str, ...]  # the readouts scored
  fold_error: dict[str, list[float]]  # decoding -> [A] k-fold error on the known items
  chosen_alpha: dict[str, dict[str, float]]  # selection -> decoding -> alpha
  chosen_decoding: dict[str, str]  # "pas" / "few_shot" -> the decoding of their headline row
  test_log_probs: dict[float, np.ndarray]  # alpha -> f32[items, 5] with the full fit, only the
  #   alphas scored (alpha 0 always; every alpha for the oracle)
  test_prior: dict[float, np.ndarray]  # alpha -> f32[5] content-free prior of that context
  # The honest `pas` row (cross-fitted): alpha -> f32[items, 5], the fold fits' letter
  # distributions at the chosen alpha averaged (alpha 0: the unsteered row), and the prior
  crossfit_log_probs: dict[float, np.ndarray]
  crossfit_prior: dict[float, np.ndarray]
  fold_steering: np.ndarray | None  # f32[folds, layers, heads, head_dim] at alpha 1 (k-fold)
  known_log_probs: dict[float, np.ndarray]  # alpha -> f32[120, 5] known items, out of fold
  test_error: dict[str, dict[float, float]]  # decoding -> alpha -> error sum (if answers known)
  selection: dict | None  # how alpha and readout were chosen (`selection.Selection.record`)
  probe_predictions: np.ndarray | None  # int[items]: `pas_probes` answers (None: not asked)
  probe_note: str | None  # why `pas_probes` fell back, if it did
  # `generated` readout (opt-in): row ("few_shot", "pas") -> int[items] answers parsed from
  # greedy text (0 = unparsable), and how they agree with the argmax letter
  generated: dict[str, np.ndarray]
  generated_agreement: dict[str, dict]
  work: dict  # what was computed (alphas, items, contexts) and seconds per stage (batch totals)

  def test_rows(self, fits: str = "full") -> tuple[dict, dict]:
    """`(alpha -> log-probabilities, alpha -> prior)` on the test items: "full" (the fit on all
    known items) or "folds" (the cross-fitted fold fits of the honest row)."""
    if fits == "folds":
      return self.crossfit_log_probs, self.crossfit_prior
    return self.test_log_probs, self.test_prior

  def decoded(self, alpha: float, decoding: str, fits: str = "full"
              ) -> tuple[np.ndarray, str | None]:
    """`(int[items] answers 1..5 on the test items at a scored alpha, fallback note)`."""
    alpha = float(alpha)
    log_probs, prior = self.test_rows(fits)
    match = None
    if alpha in self.known_log_probs:
      match = (self.known_log_probs[alpha], self.known_answers)
    return readout.decode(log_probs[alpha], decoding, prior=prior.get(alpha), match=match)

  def predictions(self, alpha: float, decoding: str, fits: str = "full") -> np.ndarray:
    """`int[items]` answers 1..5 on the test items at a scored alpha."""
    return self.decoded(alpha, decoding, fits)[0]

  def steering(self, alpha: float) -> np.ndarray:
    """`f32[layers, heads, head_dim]`: alpha * sigma * direction on the kept heads (full fit)."""
    return (alpha * self.sigma * self.head_mask)[..., None] * self.directions


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


def subject_seeds(subject_ids: Sequence[str]) -> np.ndarray:
  """`int32[subjects]`: a stable per-subject seed, so a subject's fit does not depend on which
  other subjects share its batch."""
  return np.array([zlib.crc32(str(s).encode()) & 0x7FFFFFFF for s in subject_ids], np.int32)


class _Stages:
  """Wall seconds per named stage (a stage may run several times)."""

  def __init__(self, progress: Callable[[str], None]):
    self.seconds: dict[str, float] = {}
    self.progress = progress

  def run(self, name: str, label: str, fn, *args, **kwargs):
    self.progress(label)
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
    return result


def _contexts(engine, known: np.ndarray) -> list[np.ndarray]:
  return [engine.context_tokens(prompts.few_shot_system_prompt(row)) for row in known]


def align_subjects(engine, activations: np.ndarray, subjects: data.Subjects,
                   settings: AlignSettings, *, selections: Sequence[str] = ("kfold_known",),
                   heldout: np.ndarray | None = None,
                   heldout_activations: np.ndarray | None = None, score_test: bool = True,
                   progress: Callable[[str], None] | None = None) -> list[SubjectAlignment]:
  """Aligns a batch of subjects (see the module docstring).

  Args:
    engine: a `palign_jax.engine.Engine` (model, tokenizer, scoring).
    activations: `f32[120, 2, layers, heads, head_dim]` shared head outputs (`engine.activations`).
    subjects: the batch; only their 120 known answers are read, except by `oracle_test`.
    selections: any of `SELECTIONS`; `kfold_known` runs the folds, `oracle_test` scores every
      alpha on the test items and reads the subjects' held-out answers.
    heldout: the test items (default: the benchmark's 180); may be empty (a user's own answers).
    heldout_activations: `f32[len(heldout), 2, layers, heads, head_dim]` the same head outputs
      for the test items (`engine.activations("heldout")`): asks for `pas_probes`.
    score_test: score the test items at alpha 0 and the chosen alphas (False: only
      `pas_probes` is wanted, and no selection may be asked for).
  """
  unknown = [s for s in selections if s not in SELECTIONS]
  if unknown:
    raise UserInputError(f"alpha selection {unknown} is not one of {SELECTIONS}")
  if selections and not score_test:
    raise ValueError("align_subjects: an alpha selection needs score_test")
  stages = _Stages(progress or (lambda _: None))
  split = data.load_split()
  heldout = split.heldout if heldout is None else np.asarray(heldout)
  known = data.known_answers(subjects).astype(np.int32)
  if "oracle_test" in selections:
    missing = [s for s, row in zip(subjects.ids, subjects.answers[:, heldout], strict=True)
               if not (row > 0).any()]
    if missing or not len(heldout):
      raise UserInputError(f"oracle_test needs held-out answers, which subjects {missing[:5]} "
                           "do not have; use kfold_known")
  alphas = np.asarray(settings.alphas, np.float32)
  zero = int(np.flatnonzero(alphas == 0)[0])
  seeds = subject_seeds(subjects.ids)
  base_key = jax.random.PRNGKey(settings.seed)

  mesh = engine.mesh
  shared_activations = parallel.replicate(mesh, activations)

  def fit(answers, salt):  # the subjects split over the mesh's data axis
    return pas_fit.fit_pas(shared_activations, parallel.put_batch(mesh, answers), settings.fit,
                           key=jax.random.fold_in(base_key, salt), subject_ids=seeds, mesh=mesh)

  full_fit = stages.run("probes", "PAS fit on the known items", fit, known, 0)

  decodings = settings.decodings
  kfold = "kfold_known" in selections
  fold_error: dict[str, np.ndarray] = {}
  chosen: dict[str, dict[str, np.ndarray]] = {}
  choice: dict[str, list[tuple[str, int]]] = {}  # row -> per subject (decoding, alpha index)
  picks: list[selection_lib.Selection | None] = [None] * len(known)
  known_log_probs = np.zeros((len(known), 0, len(split.known), 5), np.float32)
  fold_fits: list[pas_fit.PasFit] = []
  probe_known = np.zeros((len(known), len(split.known)))  # out-of-fold probe scores
  if kfold or heldout_activations is not None:
    fold = fold_of_known_items(settings.folds, settings.seed)
    if kfold:
      known_log_probs = np.zeros((len(known), len(alphas), len(split.known), 5), np.float32)
      fold_prior = np.zeros((len(known), settings.folds, len(alphas), 5))
    for f in range(settings.folds):
      in_fold = fold == f
      visible = np.where(in_fold[None, :], 0, known)
      fold_fit = stages.run("fold_probes", f"fold {f + 1}/{settings.folds}: PAS fit", fit,
                            visible, f + 1)
      fold_fits.append(fold_fit)
      probe_known[:, in_fold] = parallel.to_host(pas_fit.item_scores(fold_fit,
                                                                     activations[in_fold]))
      if not kfold:
        continue
      log_probs, prior = stages.run(
          "fold_sweep", f"fold {f + 1}/{settings.folds}: {len(alphas)} alphas x "
          f"{int(in_fold.sum())} items", engine.score, _contexts(engine, visible),
          split.known[in_fold], steering=pas_fit.steering_vectors(fold_fit, alphas),
          content_free=True)
      known_log_probs[:, :, in_fold] = log_probs.reshape(len(known), len(alphas), -1, 5)
      fold_prior[:, f] = prior.reshape(len(known), len(alphas), 5)
  if kfold:
    # The choice, on the known items' out-of-fold scores only (`selection`).
    picks = [selection_lib.select(known_log_probs[s], fold_prior[s], known[s], fold, decodings,
                                  settings.choice, settings.selection)[0]
             for s in range(len(known))]
    fold_error = {d: np.stack([p.errors[d] for p in picks]) for d in decodings}
    # Every readout's row reads the test items at the headline's alpha: the test sweep
    # scores alpha 0 and that one alpha, not one alpha per readout.
    chosen["kfold_known"] = {d: np.array([p.index for p in picks]) for d in decodings}
    choice["few_shot"] = [(p.decoding, zero) for p in picks]  # the same readout as pas
    choice["pas"] = [(p.decoding, p.index) for p in picks]
  else:
    fixed = settings.choice if settings.choice != "kfold" else decodings[0]
    choice["few_shot"] = [(fixed, zero)] * len(known)

  # The full fit's test sweep pays only for what is asked: alpha 0 (few-shot), every alpha for
  # the oracle, and the chosen alpha for the opt-in generated readout (the paper's single
  # steering vector); the honest row's chosen alpha is read with the fold fits below.
  wanted = [{zero} for _ in range(len(known))]
  if settings.generated and "pas" in choice:
    for s, (_, index) in enumerate(choice["pas"]):
      wanted[s].add(int(index))
  if "oracle_test" in selections:
    wanted = [set(range(len(alphas))) for _ in range(len(known))]
  pairs = np.array([(s, a) for s in range(len(known)) for a in sorted(wanted[s])], np.int64)
  scored = np.zeros((len(pairs), len(heldout), len(prompts.OPTION_LETTERS)), np.float32)
  priors = np.zeros((len(pairs), len(prompts.OPTION_LETTERS)))
  if len(heldout) and score_test:
    scored, priors = stages.run(
        "test_sweep", f"test items: {len(pairs)} (subject, alpha) contexts x {len(heldout)} "
        "items", engine.score, _contexts(engine, known), heldout,
        steering=pas_fit.steering_vectors(full_fit, alphas), pairs=pairs, content_free=True)
  test_log_probs = [{} for _ in range(len(known))]
  test_prior = [{} for _ in range(len(known))]
  if score_test:
    for (s, a), log_probs, prior in zip(pairs, scored, priors, strict=True):
      test_log_probs[s][float(alphas[a])] = log_probs
      test_prior[s][float(alphas[a])] = prior
  crossfit_log_probs, crossfit_prior = _crossfit_rows(
      engine, stages, known, heldout, fold_fits, choice.get("pas"), alphas, zero,
      test_log_probs, test_prior) if kfold and score_test else (
          [{} for _ in known], [{} for _ in known])
  fold_steering = (np.stack([parallel.to_host(pas_fit.steering_for_alpha(f, 1.0))
                             for f in fold_fits],
                            axis=1) if kfold else None)

  def matched_on(s, alpha_value):
    index = int(np.flatnonzero(alphas == alpha_value)[0])
    if known_log_probs.shape[1] == 0:
      return None
    return (known_log_probs[s, index], known[s])

  test_error: list[dict[str, dict[float, float]]] = [{} for _ in range(len(known))]
  if score_test and len(heldout) and (subjects.answers[:, heldout] > 0).any():
    for s in range(len(known)):
      scored_alphas = sorted(test_log_probs[s])
      for d in decodings:
        predicted = np.stack([readout.decode(test_log_probs[s][a], d, prior=test_prior[s][a],
                                             match=matched_on(s, a))[0] for a in scored_alphas])
        errors = metric.trait_errors([subjects.ids[s]] * len(scored_alphas), predicted,
                                     np.repeat(subjects.answers[s:s + 1], len(scored_alphas), 0),
                                     heldout).composite
        test_error[s][d] = {a: float(e) for a, e in zip(scored_alphas, errors, strict=True)}
  if "oracle_test" in selections:
    chosen["oracle_test"] = {
        d: np.array([int(np.argmin(np.nan_to_num(list(test_error[s][d].values()), nan=np.inf)))
                     for s in range(len(known))]) for d in decodings}

  generated: list[dict] = [{} for _ in range(len(known))]
  agreement: list[dict] = [{} for _ in range(len(known))]
  if settings.generated and score_test and len(heldout) and "pas" in choice:
    alpha_of = np.array([alphas[a] for _, a in choice["pas"]], np.float32)
    steer = pas_fit.steering_for_alpha(full_fit, alpha_of)
    rows = stages.run(
        "generated", f"generated readout: {2 * len(known)} contexts x {len(heldout)} items, "
        "greedy", generated_lib.generate_answers, engine, _contexts(engine, known) * 2,
        heldout, steering=jax.numpy.concatenate([jax.numpy.zeros_like(steer), steer]))
    for s in range(len(known)):
      for row, answers_, alpha in (("few_shot", rows.answers[s], 0.0),
                                   ("pas", rows.answers[len(known) + s], float(alpha_of[s]))):
        generated[s][row] = answers_
        agreement[s][row] = generated_lib.agreement(answers_, test_log_probs[s][alpha])
        if row == "pas":
          agreement[s][row]["steering"] = "the full fit (the paper's single vector)"
  probe_predictions: list = [None] * len(known)
  probe_notes: list = [None] * len(known)
  if heldout_activations is not None:
    probe_test = stages.run("probe_readout", "pas_probes: the probes on the test items",
                            pas_fit.item_scores, full_fit, heldout_activations)
    probe_test = parallel.to_host(probe_test)
    for s in range(len(known)):
      probe_predictions[s], probe_notes[s] = probe_readout(
          probe_known[s], known[s], probe_test[s])

  work = {"content_free_questions": len(readout.CONTENT_FREE_STATEMENTS),
          "subjects_in_batch": len(known), "stage_seconds": dict(stages.seconds),
          "selections": list(selections), "folds": settings.folds if kfold else 0,
          "fold_alphas": [float(a) for a in alphas] if kfold else [],
          "test_items": int(len(heldout))}
  if settings.alpha_range is not None:
    work["alpha_range"] = settings.alpha_range
  results = []
  labels = [float(a) for a in alphas]
  full_fit = jax.tree.map(parallel.to_host, full_fit)  # from every process, in a pod run
  for s, sid in enumerate(subjects.ids):
    results.append(SubjectAlignment(
        subject_id=sid, alphas=alphas, valid=bool(full_fit.valid[s]),
        num_labelled=int(full_fit.num_labelled[s]),
        head_mask=np.asarray(full_fit.head_mask[s]),
        directions=np.asarray(full_fit.directions[s]), sigma=np.asarray(full_fit.sigma[s]),
        heldout=heldout, known_answers=known[s], decodings=decodings,
        fold_error={d: [float(v) for v in e[s]] for d, e in fold_error.items()},
        chosen_alpha={sel: {d: float(alphas[i[s]]) for d, i in by.items()}
                      for sel, by in chosen.items()},
        chosen_decoding={row: picks_[s][0] for row, picks_ in choice.items()},
        test_log_probs=test_log_probs[s], test_prior=test_prior[s],
        crossfit_log_probs=crossfit_log_probs[s], crossfit_prior=crossfit_prior[s],
        fold_steering=None if fold_steering is None else fold_steering[s],
        known_log_probs={float(a): known_log_probs[s, i]
                         for i, a in enumerate(alphas[:known_log_probs.shape[1]])},
        test_error=test_error[s],
        selection=None if picks[s] is None else picks[s].record(labels),
        probe_predictions=probe_predictions[s], probe_note=probe_notes[s],
        generated=generated[s], generated_agreement=agreement[s],
        work=dict(work, test_alphas=sorted(test_log_probs[s]))))
  return results


def _crossfit_rows(engine, stages: _Stages, known: np.ndarray, heldout: np.ndarray,
                   fold_fits: Sequence[pas_fit.PasFit], picks: Sequence[tuple[str, int]],
                   alphas: np.ndarray, zero: int, test_log_probs: list[dict],
                   test_prior: list[dict]) -> tuple[list[dict], list[dict]]:
  """The honest row's test scores: per subject `{chosen alpha: f32[items, 5]}` and its prior.

  A subject whose choice is alpha 0 reads the unsteered row. The others are scored once per
  fold fit at their chosen alpha, under the context of all their known answers, and the k
  distributions are averaged (the log of the mean probability over the full vocabulary, so the
  letter mass stays comparable; the content-free priors likewise).
  """
  log_probs = [{} for _ in known]
  priors = [{} for _ in known]
  for s, (_, index) in enumerate(picks):
    if index == zero:
      log_probs[s][0.0], priors[s][0.0] = test_log_probs[s][0.0], test_prior[s][0.0]
  steered = [s for s, (_, index) in enumerate(picks) if index != zero]
  if not steered:
    return log_probs, priors
  alpha_of = alphas[[index for _, index in picks]]
  if not len(heldout):  # a user's own answers: nothing to score
    for s in steered:
      log_probs[s][float(alpha_of[s])] = test_log_probs[s][0.0]
      priors[s][float(alpha_of[s])] = test_prior[s][0.0]
    return log_probs, priors
  steering = jax.numpy.stack([pas_fit.steering_for_alpha(f, alpha_of) for f in fold_fits],
                             axis=1)  # [S, folds, L, H, D]
  folds = len(fold_fits)
  pairs = np.array([(s, f) for s in steered for f in range(folds)], np.int64)
  scored, prior = stages.run(
      "crossfit_test", f"test items: {len(steered)} subjects x {folds} fold fits at the chosen "
      f"alpha x {len(heldout)} items", engine.score, _contexts(engine, known), heldout,
      steering=steering, pairs=pairs, content_free=True)
  scored = np.asarray(scored, np.float64).reshape(len(steered), folds, len(heldout), -1)
  prior = np.asarray(prior, np.float64).reshape(len(steered), folds, -1)
  for j, s in enumerate(steered):
    alpha = float(alpha_of[s])
    log_probs[s][alpha] = (np.logaddexp.reduce(scored[j], axis=0) - np.log(folds)).astype(
        np.float32)
    priors[s][alpha] = np.logaddexp.reduce(prior[j], axis=0) - np.log(folds)
  return log_probs, priors


def probe_readout(known_scores: np.ndarray, known: np.ndarray,
                  test_scores: np.ndarray) -> tuple[np.ndarray, str | None]:
  """`pas_probes` answers `int[items]` from probe scores, and a note if it fell back.

  known_scores: `[120]` out-of-fold probe scores of the known items (each from the fold fit
  that did not see the item's answer); known: `int[120]` the answers; test_scores: `[items]`.
  The quantile map (`readout.quantile_map`) turns the test scores' ranks among the known ones
  into the subject's own answer distribution; too few distinct known answers: all 3.
  """
  answered = known > 0
  if not readout.can_match(known):
    return np.full(len(test_scores), 3, np.int64), ("too few distinct known answers to map "
                                                    "probe scores: 3 for every item")
  return readout.quantile_map(known_scores[answered], known[answered], test_scores), None
