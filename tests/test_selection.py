"""Honest selection (`protocol.selection`), the model's alpha range, the `pas_probes` readout
and the paired verdicts, each against a hand computation in numpy float64."""

import jax
import numpy as np
import pytest

from palign_jax import data, prompts, readout
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods as methods_lib
from palign_jax.evaluation import metrics
from palign_jax.pas import fit as pas_fit
from palign_jax.protocol import alignment, alpha_range, dpo
from palign_jax.protocol import selection as sel

SETTINGS = sel.SelectionSettings(min_mass_ratio=0.9, min_low_mass_ratio=0.5, mass_quantile=0.1,
                                 se_rule=1.0)
KNOWN_TRAITS = data.load_items().trait[data.load_split().known]


def test_composite_error_is_the_benchmark_metric_with_its_standard_error():
  rng = np.random.default_rng(0)
  actual = rng.integers(0, 6, 120)  # 0 = unanswered
  predicted = rng.integers(1, 6, (3, 120))
  error, se = sel.composite_error(predicted, actual, KNOWN_TRAITS)
  for c in range(3):
    total, variance = 0.0, 0.0
    for t in range(5):
      e = [abs(float(p) - float(a)) for p, a, tr in zip(predicted[c], actual, KNOWN_TRAITS,
                                                        strict=True) if tr == t and a > 0]
      total += sum(e) / len(e)
      variance += np.var(e, ddof=1) / len(e)
    assert error[c] == pytest.approx(total, abs=1e-12)
    assert se[c] == pytest.approx(np.sqrt(variance), abs=1e-12)


def test_one_standard_error_rule_prefers_no_change():
  error = np.array([3.0, 2.9, 2.5, 2.45])
  se = np.array([0.2, 0.2, 0.1, 0.1])
  # best is 3 (2.45); bar 2.55: candidate 2 (2.5) is the least change under it.
  assert sel.choose_candidate(error, se, {}, 1.0) == (2, 3, pytest.approx(2.55))
  assert sel.choose_candidate(error, se, {}, 0.0)[0] == 3  # plain argmin
  assert sel.choose_candidate(error, se * 10, {}, 1.0)[0] == 0  # everything is noise
  # Inadmissible candidates are never chosen, not even as the best.
  chosen, best, _ = sel.choose_candidate(error, se, {2: "x", 3: "y"}, 1.0)
  assert (chosen, best) == (0, 1)
  # NaN (a candidate not computed) is never chosen; candidate 0 always stands.
  assert sel.choose_candidate(np.array([3.0, np.nan]), np.zeros(2), {}, 1.0)[0] == 0


def test_admissibility_by_letter_mass():
  mean = np.array([0.99, 0.95, 0.80, 0.97])
  low = np.array([0.90, 0.50, 0.85, 0.40])
  why = sel.admissible(mean, low, SETTINGS)
  assert set(why) == {2, 3}
  assert "mean" in why[2] and "0.1-quantile" in why[3]
  assert set(sel.admissible(mean, low, SETTINGS, usable=np.array([1, 0, 1, 1], bool))) == {
      1, 2, 3}


def test_readout_is_chosen_at_no_change_then_candidate_under_it():
  """A readout that looks best only at a big alpha is not chosen; the alpha is chosen under
  the readout that is best at alpha 0, and low-mass candidates are out."""
  known = data.known_answers(data.load_papi_subjects())[0].astype(np.int64)
  fold = alignment.fold_of_known_items(3, 0)
  letters = np.eye(5)[5 - np.clip(known, 1, 5)]  # one-hot on the subject's own letter
  neutral = np.eye(5)[np.full(120, 2)]  # letter C, answer 3
  c0 = np.log(0.97 * (0.9 * neutral + 0.1 * 0.2))  # answers 3 to everything, mass 0.97
  c1 = np.log(0.97 * (0.9 * letters + 0.1 * 0.2))  # the person's own answers, mass 0.97
  c2 = np.log(0.05 * letters + 1e-6)  # perfect letters but mass 0.05: inadmissible
  log_probs = np.stack([c0, c1, c2])
  prior = np.zeros((3, 3, 5)) + np.log(0.2)
  pick, predictions = sel.select(log_probs, prior, known, fold, readout.DECODINGS, "kfold",
                                 SETTINGS)
  assert set(pick.inadmissible) == {2}
  assert pick.index == 1 and pick.best == 1
  errors_at_zero = {d: pick.errors[d][0] for d in readout.DECODINGS}
  assert pick.decoding == min(readout.DECODINGS, key=lambda d: (errors_at_zero[d],
                                                                readout.DECODINGS.index(d)))
  record = pick.record([0.0, 1.0, 2.0])
  assert record["chosen"] == 1.0 and record["inadmissible"].keys() == {"2.0"}
  assert record["standard_error_over"] == "items"
  np.testing.assert_array_equal(predictions["argmax"][1],
                                readout.answers(log_probs[1], "argmax"))
  # A fixed readout is used as given.
  assert sel.select(log_probs, prior, known, fold, readout.DECODINGS, "median",
                    SETTINGS)[0].decoding == "median"


def test_settings_are_checked():
  from conftest import tiny_run_config
  config = tiny_run_config("unused", **{"selection.min_mass_ratio": 1.5})
  with pytest.raises(UserInputError, match="config.selection.min_mass_ratio"):
    sel.SelectionSettings.from_config(config)
  config = tiny_run_config("unused", **{"pas.range.probe_alphas": (2.0, 1.0)})
  with pytest.raises(UserInputError, match="probe_alphas"):
    alpha_range.RangeSettings.from_config(config)


def test_alpha_grid_from_letter_masses():
  probes = (0.5, 1.0, 2.0, 4.0)
  mean = [0.99, 0.99, 0.98, 0.95, 0.5]
  low = [0.9, 0.9, 0.9, 0.9, 0.1]
  alpha_max, grid, why = alpha_range.grid_from_masses(probes, mean, low, SETTINGS, (0.5, 1.0))
  assert alpha_max == 2.0 and grid == (0.0, 1.0, 2.0) and set(why) == {"4.0"}
  # The first inadmissible alpha ends the range even if a larger one recovers.
  mean2 = [0.99, 0.99, 0.5, 0.99, 0.99]
  assert alpha_range.grid_from_masses(probes, mean2, low[:4] + [0.9], SETTINGS,
                                      (1.0,))[:2] == (0.5, (0.0, 0.5))
  assert alpha_range.grid_from_masses(probes, [0.99, 0.1, 0.1, 0.1, 0.1], low, SETTINGS,
                                      (1.0,))[:2] == (None, (0.0,))


def test_model_range_is_measured_once_on_known_items(tiny_engine, monkeypatch, capsys):
  from conftest import tiny_run_config
  config = tiny_run_config("unused", **{"pas.alpha_grid": "model_range",
                                        "pas.range.subjects": "0:2",
                                        "pas.range.items_per_trait": 1})
  calls = []
  original = tiny_engine.score
  monkeypatch.setattr(tiny_engine, "score", lambda *a, **k: calls.append(a[1]) or original(
      *a, **k))
  lines = []
  settings = alignment.AlignSettings.for_engine(config, tiny_engine, progress=lines.append)
  record = settings.alpha_range
  assert "measuring the alpha range" in lines[0]
  bar = capsys.readouterr().err  # a bar over the 2 x 7 (context, alpha) pairs
  assert "alpha range: 100%" in bar and "14/14" in bar
  items = alpha_range.range_items(1, 0)
  contexts = [tiny_engine.context_tokens(prompts.few_shot_system_prompt(row))
              for row in data.known_answers(data.load_papi_subjects().select(
                  list(data.load_papi_subjects().ids[:2])))]
  fit = pas_fit.fit_pas(tiny_engine.activations(), data.known_answers(
      data.load_papi_subjects().select(list(data.load_papi_subjects().ids[:2]))).astype(
      np.int32), settings.fit, key=jax.random.PRNGKey(0), subject_ids=np.arange(2))
  for k, alpha in enumerate(record["probe_alphas"]):
    masses = [readout.letter_mass(original(
        [contexts[s]], items, steering=pas_fit.steering_vectors(fit, [alpha])[s:s + 1]))
        for s in range(2)]
    assert record["letter_mass_mean"][k] == pytest.approx(np.mean(masses), rel=1e-4)
  assert settings.alphas == tuple(record["alphas"]) and settings.alphas[0] == 0.0
  assert record["probe_alphas"] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
  # one call per prefix batch of the 2 x 7 (context, alpha) pairs, known items only
  measured_calls = len(calls)
  assert measured_calls == -(-14 // tiny_engine.prefix_batch(max(map(len, contexts))))
  assert all(set(c) <= set(data.load_split().known) for c in calls)
  # The recorded masses are those of each probe alpha's rows (contexts x alphas, context-major).
  steering_calls = []
  monkeypatch.setattr(tiny_engine, "score", lambda *a, **k: steering_calls.append(
      k["steering"]) or original(*a, **k))
  again = alignment.AlignSettings.for_engine(config, tiny_engine)
  assert not steering_calls
  assert len(calls) == measured_calls and again.alpha_range["from_cache"]  # cached per model
  assert again.alphas == settings.alphas


def test_probe_item_scores_equal_a_hand_computation():
  rng = np.random.default_rng(1)
  S, N, L, H, D = 2, 4, 2, 3, 5
  acts = rng.standard_normal((N, 2, L, H, D)).astype(np.float32)
  coef = rng.standard_normal((S, L, H, D)).astype(np.float32)
  intercept = rng.standard_normal((S, L, H)).astype(np.float32)
  mask = np.zeros((S, L, H), bool)
  mask[0, 0, 1] = mask[0, 1, 2] = True  # subject 1 keeps no head
  zeros = np.zeros((S, L, H), np.float32)
  fit = pas_fit.PasFit(head_mask=mask, directions=np.zeros((S, L, H, D), np.float32),
                       sigma=zeros, train_accuracy=zeros, val_accuracy=zeros, probe_coef=coef,
                       probe_intercept=intercept, probe_converged=mask,
                       num_labelled=np.zeros(S, np.int32), valid=np.ones(S, bool))
  got = np.asarray(pas_fit.item_scores(fit, acts))
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  for n in range(N):
    heads = [(0, 1), (1, 2)]
    want = np.mean([sigmoid(acts[n, 0, l_, h].astype(np.float64) @ coef[0, l_, h]
                            + intercept[0, l_, h])
                    - sigmoid(acts[n, 1, l_, h].astype(np.float64) @ coef[0, l_, h]
                              + intercept[0, l_, h]) for l_, h in heads])
    assert got[0, n] == pytest.approx(want, abs=1e-6)
  np.testing.assert_array_equal(got[1], 0.0)


def test_probe_readout_maps_ranks_to_the_subjects_answers():
  known_scores = np.linspace(-1, 1, 120)
  known = np.repeat([1, 2, 3, 4, 5], 24)  # answers rise with the score
  known[::7] = 0  # some unanswered
  predicted, note = alignment.probe_readout(known_scores, known, np.array([-0.99, 0.0, 0.99]))
  assert note is None and list(predicted) == [1, 3, 5]
  answered = known > 0
  np.testing.assert_array_equal(
      predicted, readout.quantile_map(known_scores[answered], known[answered],
                                      np.array([-0.99, 0.0, 0.99])))
  flat, note = alignment.probe_readout(known_scores, np.full(120, 4), np.zeros(3))
  assert list(flat) == [3, 3, 3] and "too few distinct" in note


def test_paired_verdict_against_numpy():
  rng = np.random.default_rng(2)
  a, b = rng.normal(3, 0.5, 12), rng.normal(3.2, 0.5, 12)
  b[3] = a[3]
  a[5] = np.nan  # not scored: left out
  v = metrics.paired("pas", a, "few_shot", b, seed=7)
  diff = (a - b)[np.isfinite(a - b)]
  assert v.n_subjects == 11 and v.mean == pytest.approx(diff.mean())
  assert (v.wins, v.ties, v.losses) == ((diff < 0).sum(), 1, (diff > 0).sum() - 0)
  boot = diff[np.random.default_rng(7).integers(0, 11, (2000, 11))].mean(1)
  assert (v.ci_low, v.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
  assert "better for" in v.sentence()


def test_verdict_rows_and_headline():
  rows = ["zero_shot", "few_shot", "few_shot [matched]", "pas", "pas [median]",
          "pas [calibrated]", "dpo", "pas_probes", "constant_3"]
  pairs = methods_lib.verdict_rows(rows)
  assert ("pas", "few_shot") in pairs and ("pas", "constant_3") in pairs
  assert ("dpo", "zero_shot") in pairs and ("pas_probes", "few_shot") in pairs
  assert ("few_shot [matched]", "few_shot") in pairs and ("pas [calibrated]", "few_shot") in pairs
  assert not any(r == "pas [median]" for r, _ in pairs)
  assert pairs[0] == ("few_shot", "constant_3")
  v = metrics.paired("pas", np.array([1.0, 2.0, 3.0]), "few_shot", np.array([1.5, 2.0, 2.5]))
  text = methods_lib.headline([v])
  assert "helped 1 of 3 subjects (hurt 1, 1 unchanged)" in text and "few_shot" in text


def test_dpo_candidates_order_fewest_steps_first():
  # Step 0 (the base model) once; then fewer steps first and, at equal steps, the smaller
  # learning rate first (least change), whatever the config's order of the rates.
  assert dpo._candidates([1e-4, 1e-3], 3) == [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
  assert dpo._candidates([1e-3, 1e-4], 3) == [(0, 0), (1, 1), (0, 1), (1, 2), (0, 2)]
  assert dpo._candidates([1e-3, 1e-3], 2) == [(0, 0), (0, 1), (1, 1)]  # equal: config order
