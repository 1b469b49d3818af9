"""Alignment profiles: orbax round trip and refusal for another model."""

import types

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


def make_dpo_profile(**overrides):
  """A DPO profile: no steering, a LoRA adapter on q/v (forward form)."""
  rng = np.random.default_rng(1)
  adapters = {t: {"a": rng.normal(size=(3, 32, 2)).astype(np.float32),
                  "b": rng.normal(size=(3, 2, out)).astype(np.float32)}
              for t, out in (("q_proj", 32), ("v_proj", 16))}
  fields = dict(subject_id="me", model_fingerprint="abc123", model_source="tiny.gguf",
                prompt_version="papi-v1", system_prompt="You are a helpful assistant.",
                alpha=0.0, alpha_selection="kfold_known", known_answers=rng.integers(0, 6, 120),
                head_mask=None, directions=None, sigma=None, method="dpo", adapters=adapters,
                settings={"steps": 16, "decoding": "median", "note": None})
  return profile_lib.AlignmentProfile(**{**fields, **overrides})


def test_dpo_profile_round_trip(tmp_path):
  original = make_dpo_profile()
  profile_lib.save_profile(tmp_path / "p", original)
  loaded = profile_lib.load_profile(tmp_path / "p", model_fingerprint="abc123",
                                    prompt_version="papi-v1")
  assert loaded.method == "dpo" and not loaded.has_steering and loaded.steering() is None
  assert loaded.head_mask is None and loaded.settings == original.settings
  assert loaded.system_prompt == original.system_prompt
  assert set(loaded.adapters) == {"q_proj", "v_proj"}
  for target, factors in original.adapters.items():
    for name, value in factors.items():
      np.testing.assert_array_equal(loaded.adapters[target][name], value)
  np.testing.assert_array_equal(loaded.known_answers, original.known_answers)


def test_profile_with_steering_and_adapters_keeps_both(tmp_path):
  pas = make_profile()
  both = make_dpo_profile(head_mask=pas.head_mask, directions=pas.directions, sigma=pas.sigma,
                          alpha=4.0, method="pas")
  profile_lib.save_profile(tmp_path / "p", both)
  loaded = profile_lib.load_profile(tmp_path / "p")
  np.testing.assert_allclose(loaded.steering(), pas.steering(), rtol=1e-6)
  np.testing.assert_array_equal(loaded.adapters["v_proj"]["b"], both.adapters["v_proj"]["b"])


def test_dpo_profile_from_another_model_is_refused(tmp_path):
  profile_lib.save_profile(tmp_path / "p", make_dpo_profile())
  with pytest.raises(UserInputError, match="fingerprint abc123.*LoRA adapters"):
    profile_lib.load_profile(tmp_path / "p", model_fingerprint="other")
  assert profile_lib.load_profile(tmp_path / "p", model_fingerprint="abc123").adapters


def save_as_version_1(path, profile, version=1):
  """What the version-1 writer (PAS only, before adapters) put on disk."""
  import orbax.checkpoint as ocp
  arrays = {"known_answers": np.asarray(profile.known_answers, np.int32),
            "head_mask": np.asarray(profile.head_mask, np.int32),
            "directions": profile.directions, "sigma": profile.sigma}
  meta = {k: getattr(profile, k) for k in (
      "subject_id", "model_fingerprint", "model_source", "prompt_version", "system_prompt",
      "alpha", "alpha_selection", "settings")}
  meta["format_version"] = version
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path.absolute(), ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))


def test_older_and_newer_format_versions(tmp_path):
  """A version-1 (PAS only) profile still loads as PAS; an unknown version is refused."""
  original = make_profile()
  save_as_version_1(tmp_path / "v1", original)
  save_as_version_1(tmp_path / "v3", original, version=3)
  loaded = profile_lib.load_profile(tmp_path / "v1", model_fingerprint="abc123")
  assert loaded.method == "pas" and loaded.adapters is None and loaded.has_steering
  np.testing.assert_allclose(loaded.steering(), original.steering(), rtol=1e-6)
  with pytest.raises(UserInputError, match="format version 3"):
    profile_lib.load_profile(tmp_path / "v3")


def test_bad_profiles_are_not_saved(tmp_path):
  with pytest.raises(UserInputError, match="method"):
    profile_lib.save_profile(tmp_path / "p", make_dpo_profile(method="ppo"))
  with pytest.raises(UserInputError, match="alpha 0"):
    profile_lib.save_profile(tmp_path / "p", make_dpo_profile(alpha=2.0))


def test_honest_profile_steers_with_the_mean_of_the_fold_fits():
  """A k-fold profile's steering at its alpha is alpha x the mean of the fold fits' alpha-1
  vectors (the fits the alpha was chosen on), not the full fit's."""
  rng = np.random.default_rng(1)
  fold_steering = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
  fold_steering[:, 0, 1] = 0.0  # a head no fold kept
  full = make_profile()
  alignment = types.SimpleNamespace(
      subject_id="me", chosen_alpha={"kfold_known": {"argmax": 2.0},
                                     "oracle_test": {"argmax": 8.0}},
      head_mask=full.head_mask, directions=full.directions, sigma=full.sigma,
      fold_steering=fold_steering)
  common = dict(model_fingerprint="abc123", model_source="tiny.gguf",
                known_answers=np.full(120, 4), decoding="argmax", settings={})
  honest = profile_lib.profile_from_alignment(alignment, selection="kfold_known", **common)
  np.testing.assert_allclose(honest.steering(), 2.0 * fold_steering.astype(np.float64).mean(0),
                             rtol=1e-5, atol=1e-6)
  assert not honest.head_mask[0, 1] and honest.settings["steering"] == "mean of the 3 fold fits"
  oracle = profile_lib.profile_from_alignment(alignment, selection="oracle_test", **common)
  np.testing.assert_allclose(oracle.steering(), 8.0 / 4.0 * full.steering(), rtol=1e-6)
