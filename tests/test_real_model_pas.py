"""Slow: PAS end to end on the real SmolLM2-135M-Instruct for 2 PAPI subjects.

Run with `python -m pytest -m slow tests/test_real_model_pas.py`.
"""

import numpy as np
import pytest

from palign_jax import data, engine, prompts
from palign_jax.evaluation import methods
from palign_jax.pas import search

pytestmark = pytest.mark.slow


def test_pas_on_smollm2_two_subjects():
  smollm = engine.Engine.load(None)
  subjects = data.load_papi_subjects().select(list(data.load_papi_subjects().ids[:2]))
  settings = search.PasSettings(top_k=24, alphas=(0.0, 4.0), folds=2, seed=0)
  heldout = data.load_split().heldout[::6]
  sweep = search.run_sweep(smollm.score, smollm.activations(),
                           data.known_answers(subjects).astype(np.int64), settings,
                           subject_ids=subjects.ids, heldout=heldout)
  assert bool(np.all(sweep.fit.valid))
  assert sweep.fit.head_mask.sum(axis=(1, 2)).tolist() == [24, 24]
  assert np.isfinite(sweep.test_log_probs).all()
  # Steering with alpha 4 moves the letter distribution of the real model.
  assert np.abs(sweep.test_log_probs[:, 1] - sweep.test_log_probs[:, 0]).max() > 1e-3
  records = methods.sweep_records(sweep, subjects, ["few_shot", "pas", "pas_oracle_test"],
                                  settings, 0.0)
  for record in records:
    assert record["decodings"]["argmax"]["sum"] is not None
    assert record["decodings"]["argmax"]["n_unparsable"] == 0
  # Zero-shot answers are proper distributions over A..E.
  zero = smollm.score([prompts.DEFAULT_SYSTEM_PROMPT], heldout[:4])
  np.testing.assert_allclose(np.exp(zero).sum(-1), 1.0, rtol=1e-5)
