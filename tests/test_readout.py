"""Reading answers from letter log-probabilities: decodings and the letter mass."""

import numpy as np
import pytest

from palign_jax import readout


def test_argmax_and_median_against_a_float64_reference():
  probs = np.array([[0.1, 0.2, 0.15, 0.05, 0.5],  # A..E; E most likely, median value 1
                    [0.3, 0.0, 0.0, 0.0, 0.7],
                    [0.2, 0.2, 0.2, 0.2, 0.2],
                    [0.05, 0.4, 0.1, 0.05, 0.4]])
  log_probs = np.log(np.maximum(probs, 1e-12))
  np.testing.assert_array_equal(readout.answers(log_probs), [1, 1, 5, 4])
  # Median of the value distribution (values 1..5 = letters E..A).
  expected = [int(np.searchsorted(np.cumsum(row[::-1]), 0.5) + 1) for row in probs]
  np.testing.assert_array_equal(readout.answers(log_probs, "median"), expected)
  assert expected == [1, 1, 3, 3]


def test_decodings_ignore_the_mass_outside_the_letters():
  """Log-probabilities under the full vocabulary: scaling all five letters by one factor (the
  rest of the vocabulary taking the difference) changes the mass, never the answer."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=50)
  for mass in (1.0, 0.3, 1e-3):
    log_probs = np.log(probs * mass)
    np.testing.assert_allclose(readout.letter_mass(log_probs), mass, rtol=1e-9)
    for decoding in ("argmax", "median"):
      np.testing.assert_array_equal(readout.answers(log_probs, decoding),
                                    readout.answers(np.log(probs), decoding))
  np.testing.assert_allclose(readout.letter_probabilities(np.log(probs * 0.3)), probs)


def test_unknown_decoding():
  with pytest.raises(ValueError, match="unknown decoding 'mode'"):
    readout.answers(np.zeros((1, 5)), "mode")
  with pytest.raises(ValueError, match="unknown decoding 'mode'"):
    readout.decode(np.zeros((1, 5)), "mode")


def test_contextual_calibration_by_hand():
  # Prior: the model says C whatever the statement. Item 1 leans A a little more than the
  # prior does; calibration divides the prior out and picks A.
  prior = np.log(np.array([0.1, 0.1, 0.6, 0.1, 0.1]))
  item = np.log(np.array([[0.2, 0.1, 0.5, 0.1, 0.1],     # A doubled vs the prior -> A (5)
                          [0.1, 0.1, 0.6, 0.1, 0.1],     # = prior: uniform after calibration
                          [0.05, 0.05, 0.5, 0.1, 0.3]])) # E tripled -> E (1)
  got, note = readout.decode(item, "calibrated", prior=prior)
  assert note is None
  # By hand: p / p_cf = [2, 1, .833, 1, 1], [1, 1, 1, 1, 1], [.5, .5, .833, 1, 3].
  np.testing.assert_array_equal(got, [5, 5, 1])  # ties (row 2) go to the first letter, A
  calibrated = readout.letter_probabilities(readout.calibrate(item, prior))
  np.testing.assert_allclose(calibrated[1], 0.2)
  np.testing.assert_allclose(calibrated[0], np.array([2, 1, 5 / 6, 1, 1]) / (5 + 5 / 6))
  # Medians by value (1..5 = E..A): row 1 [1, 1, .83, 1, 2] / 5.83 crosses 0.5 at 4; row 3
  # [3, 1, .83, .5, .5] / 5.83 at 1; the uniform row at 3.
  median, _ = readout.decode(item, "calibrated_median", prior=prior)
  np.testing.assert_array_equal(median, [4, 3, 1])
  # Uncalibrated, the model answers C (3) to all three.
  np.testing.assert_array_equal(readout.answers(item), [3, 3, 3])


def test_content_free_prior_averages_distributions():
  variants = np.log(np.array([[0.5, 0.5, 0, 0, 0], [0, 0, 0, 0.5, 0.5]]) + 1e-30)
  np.testing.assert_allclose(np.exp(readout.content_free_prior(variants)),
                             [0.25, 0.25, 0, 0.25, 0.25], atol=1e-12)


def test_quantile_map_reproduces_the_known_histogram():
  rng = np.random.default_rng(0)
  answers = rng.choice([1, 2, 3, 4, 5], size=120, p=[0.1, 0.2, 0.15, 0.35, 0.2])
  scores = rng.normal(size=120)  # no ties
  mapped = readout.quantile_map(scores, answers, scores)
  np.testing.assert_array_equal(np.bincount(mapped, minlength=6), np.bincount(answers,
                                                                               minlength=6))
  # Monotone: a higher score never gets a lower answer; ranks are kept.
  order = np.argsort(scores)
  assert (np.diff(mapped[order]) >= 0).all()
  # New scores beyond the range take the extreme answers.
  np.testing.assert_array_equal(readout.quantile_map(scores, answers, [-99, 99]), [1, 5])


def test_matched_decoding_reads_the_subjects_distribution_from_log_probs():
  rng = np.random.default_rng(1)
  known = rng.choice([2, 4, 5], size=40)
  known_lp = np.log(rng.dirichlet(np.ones(5), size=40))
  test_lp = np.log(rng.dirichlet(np.ones(5), size=7))
  got, note = readout.decode(test_lp, "matched", match=(known_lp, known))
  assert note is None and set(got) <= {2, 4, 5}
  on_known, _ = readout.decode(known_lp, "matched", match=(known_lp, known))
  np.testing.assert_array_equal(np.sort(on_known), np.sort(known))


@pytest.mark.parametrize("known", [np.full(120, 3), np.zeros(120, int),
                                   np.r_[np.full(5, 4), np.zeros(115, int)]])
def test_matching_falls_back_to_the_median_with_a_note(known):
  rng = np.random.default_rng(2)
  log_probs = np.log(rng.dirichlet(np.ones(5), size=6))
  got, note = readout.decode(log_probs, "matched",
                             match=(np.log(rng.dirichlet(np.ones(5), size=120)), known))
  np.testing.assert_array_equal(got, readout.answers(log_probs, "median"))
  assert "median instead" in note


def test_calibration_without_a_prior_falls_back():
  log_probs = np.log(np.full((2, 5), 0.2))
  got, note = readout.decode(log_probs, "calibrated")
  np.testing.assert_array_equal(got, readout.answers(log_probs, "median"))
  assert "content-free" in note
