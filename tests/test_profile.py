"""Alignment profiles: orbax round trip and refusal for another model."""

import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.protocol import profile as profile_lib


def make_profile():
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(3, 4, 8)).astype(np.float32)
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  return profile_lib.AlignmentProfile(
      subject_id="me", model_fingerprint="abc123", model_source="tiny.gguf",
      prompt_version="papi-v1", system_prompt="Here are some of your behaviors;x:Very Accurate",
      alpha=4.0, alpha_selection="kfold_known", known_answers=rng.integers(0, 6, 120),
      head_mask=rng.random((3, 4)) < 0.3, directions=directions,
      sigma=rng.uniform(0.5, 2, (3, 4)).astype(np.float32), settings={"top_k": 2})


def test_round_trip(tmp_path):
  original = make_profile()
  profile_lib.save_profile(tmp_path / "p", original)
  loaded = profile_lib.load_profile(tmp_path / "p", model_fingerprint="abc123",
                                    prompt_version="papi-v1")
  for field in ("subject_id", "model_fingerprint", "system_prompt", "alpha", "settings",
                "alpha_selection"):
    assert getattr(loaded, field) == getattr(original, field)
  for field in ("known_answers", "head_mask", "directions", "sigma"):
    np.testing.assert_array_equal(getattr(loaded, field), getattr(original, field))
  expected = 4.0 * original.sigma[..., None] * original.directions * original.head_mask[..., None]
  np.testing.assert_allclose(loaded.steering(), expected, rtol=1e-6)
  assert (loaded.steering()[~original.head_mask] == 0).all()


def test_wrong_model_is_refused(tmp_path):
  profile_lib.save_profile(tmp_path / "p", make_profile())
  with pytest.raises(UserInputError, match="made for model tiny.gguf"):
    profile_lib.load_profile(tmp_path / "p", model_fingerprint="other")
  with pytest.raises(UserInputError, match="prompt version"):
    profile_lib.load_profile(tmp_path / "p", prompt_version="papi-v0")


def test_not_a_profile(tmp_path):
  with pytest.raises(UserInputError, match="not an alignment profile"):
    profile_lib.load_profile(tmp_path)
