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
    for decoding in readout.DECODINGS:
      np.testing.assert_array_equal(readout.answers(log_probs, decoding),
                                    readout.answers(np.log(probs), decoding))
  np.testing.assert_allclose(readout.letter_probabilities(np.log(probs * 0.3)), probs)


def test_unknown_decoding():
  with pytest.raises(ValueError, match="unknown decoding 'mode'"):
    readout.answers(np.zeros((1, 5)), "mode")
