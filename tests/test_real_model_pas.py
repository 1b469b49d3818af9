"""Slow: PAS end to end on the real SmolLM2-135M-Instruct for 2 PAPI subjects.

Run with `bash scripts/test.sh -m slow` (CI does).
"""

import numpy as np
import pytest
from conftest import tiny_run_config

from palign_jax import data, engine, prompts, readout
from palign_jax.protocol import alignment, records

pytestmark = pytest.mark.slow


def test_pas_on_smollm2_two_subjects():
  config = tiny_run_config("default", **{"pas.top_k": 24, "pas.alphas": (0.0, 4.0),
                                         "scoring.question_batch": 20,
                                         "scoring.prefix_batch": 0})
  smollm = engine.Engine.from_config(config)
  subjects = data.load_papi_subjects().select(list(data.load_papi_subjects().ids[:2]))
  settings = alignment.AlignSettings.from_config(config, 30 * 9)
  heldout = data.load_split().heldout[::6]
  results = alignment.align_subjects(smollm, smollm.activations(), subjects, settings,
                                     selections=("kfold_known", "oracle_test"), heldout=heldout)
  for result, answers in zip(results, subjects.answers, strict=True):
    assert result.valid and result.head_mask.sum() == 24
    assert all(np.isfinite(lp).all() for lp in result.test_log_probs.values())
    # Steering with alpha 4 moves the letter distribution of the real model.
    assert np.abs(result.test_log_probs[4.0] - result.test_log_probs[0.0]).max() > 1e-3
    for record in records.pas_records(result, answers, records.SWEEP_METHODS):
      for entry in record["decodings"].values():
        assert entry["sum"] is not None and entry["n_unparsable"] == 0
        # An instruct model asked for "Option (" answers with a letter: most of its mass is
        # on the five letters (a random model's is near 5 / vocabulary).
        assert 0.5 < entry["letter_mass"]["mean"] <= 1.0
  zero = smollm.score_systems([prompts.DEFAULT_SYSTEM_PROMPT], heldout[:4])
  assert (readout.letter_mass(zero) <= 1.0 + 1e-6).all()
