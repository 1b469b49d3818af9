"""The PAS fit: mass-mean directions, sigma, kept heads, steering tensors, and sharding."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.pas import fit as pas_fit
from palign_jax.pas import labels

ITEMS, LAYERS, HEADS, DIM = 40, 2, 3, 8
REPO = pathlib.Path(__file__).resolve().parents[1]

# Shared by this process and the 8-device subprocess.
PROBLEM_SOURCE = """
def make_problem(num_items, layers, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  sign = rng.choice([-1.0, 1.0], num_items)
  trait = rng.normal(size=(layers, heads, dim)) * rng.uniform(0, 0.6, size=(layers, heads, 1))
  agree = np.array([1.0, -1.0])[None, :, None, None, None] * sign[:, None, None, None, None]
  acts = (rng.normal(size=(num_items, 1, layers, heads, dim))
          + 0.5 * rng.normal(size=(1, 2, layers, heads, dim)) + agree * trait
          + 0.3 * rng.normal(size=(num_items, 2, layers, heads, dim))).astype(np.float32)
  level = rng.normal(size=12)
  answers = np.clip(np.round(3 + 1.5 * level[:, None] * sign + rng.normal(
      size=(12, num_items))), 1, 5).astype(np.int32)
  answers[rng.uniform(size=answers.shape) < 0.1] = 0
  answers[1] = 3  # all neutral
  answers[2] = 0  # all missing
  answers[3] = 3
  answers[3, 5] = 4  # a single labelled item: below min_items
  answers[4] = np.where(rng.uniform(size=num_items) < 0.5, 4, 5)  # only high answers
  return acts, answers
"""
exec(PROBLEM_SOURCE)  # defines make_problem

INVALID = [1, 2, 3]
# The reference's probe settings, four heads kept.
SETTINGS = pas_fit.FitSettings(top_k=4, c=1.0, val_fraction=0.4, split_by="pairs", min_items=2,
                               max_iter=200, tol=1e-6)


@pytest.fixture(scope="module")
def problem():
  return make_problem(ITEMS, LAYERS, HEADS, DIM)  # noqa: F821


@pytest.fixture(scope="module")
def fit(problem):
  acts, answers = problem
  return pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS, key=jax.random.key(0))


def _numpy_directions(x, y, labelled):
  """float64 mass-mean unit directions and np.std (ddof=0) of the projections."""
  x = np.asarray(x, np.float64)
  dirs = np.zeros((len(y),) + x.shape[1:])
  sigma = np.zeros((len(y),) + x.shape[1:3])
  for s in range(len(y)):
    use = labelled[s]
    if not (use & (y[s] == 1)).any() or not (use & (y[s] == 0)).any():
      continue
    diff = x[use & (y[s] == 1)].mean(0) - x[use & (y[s] == 0)].mean(0)
    dirs[s] = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
    sigma[s] = np.std(np.einsum("nlhd,lhd->nlh", x[use], dirs[s]), axis=0)
  return dirs, sigma


def test_directions_and_sigma_match_numpy_float64():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(30, 2, 3, 8)) * rng.uniform(0.1, 3, size=(1, 2, 3, 8)) + 2.0
  y = rng.integers(0, 2, size=(4, 30))
  labelled = rng.uniform(size=(4, 30)) < 0.7
  labelled[3] = False  # nothing labelled: zeros, no NaN
  got_dirs = pas_fit.mass_mean_directions(jnp.asarray(x, jnp.float32), jnp.asarray(y),
                                             jnp.asarray(labelled))
  got_sigma = pas_fit.projection_std(jnp.asarray(x, jnp.float32), got_dirs,
                                        jnp.asarray(labelled))
  want_dirs, want_sigma = _numpy_directions(x, y, labelled)
  np.testing.assert_allclose(got_dirs, want_dirs, rtol=0, atol=2e-5)
  np.testing.assert_allclose(got_sigma, want_sigma, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got_dirs[:3], axis=-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(got_sigma[3], 0.0)


def test_fit_pas_matches_numpy_and_flags_degenerate_subjects(problem, fit):
  acts, answers = problem
  x = np.asarray(labels.flatten_activations(acts))
  lab = labels.pair_labels(answers)
  y, labelled = np.asarray(lab.labels), np.asarray(lab.labelled)
  valid = np.asarray(fit.valid)
  assert valid.tolist() == [i not in INVALID for i in range(len(answers))]
  np.testing.assert_array_equal(fit.num_labelled, labelled.sum(1))
  assert fit.num_labelled[4] == 2 * ITEMS  # only high answers still give both classes
  for field in fit:
    assert np.isfinite(np.asarray(field)).all()
  want_dirs, want_sigma = _numpy_directions(x, y, labelled & valid[:, None])
  np.testing.assert_allclose(fit.directions, want_dirs, rtol=0, atol=2e-5)
  np.testing.assert_allclose(fit.sigma, want_sigma, rtol=2e-5, atol=1e-6)
  mask = np.asarray(fit.head_mask)
  assert mask.sum(axis=(1, 2)).tolist() == [0 if i in INVALID else 4 for i in range(12)]
  score = np.asarray(fit.head_score)
  for s in np.flatnonzero(valid):
    assert score[s][mask[s]].min() >= score[s][~mask[s]].max()
  assert bool(fit.probe_converged[valid].all())


def test_top_k_changes_only_the_kept_heads(problem, fit):
  acts, answers = problem
  six = pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS._replace(top_k=6),
                        key=jax.random.key(0))
  counts = np.asarray(six.head_mask).sum(axis=(1, 2))
  assert counts.tolist() == [0 if i in INVALID else 6 for i in range(12)]
  assert (np.asarray(six.head_mask) >= np.asarray(fit.head_mask)).all()  # a superset
  np.testing.assert_array_equal(six.directions, fit.directions)


def test_steering_tensors(fit):
  alphas = jnp.array([0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
  steer = np.asarray(pas_fit.steering_vectors(fit, alphas))
  assert steer.shape == (12, 6, LAYERS, HEADS, DIM)
  mask = np.asarray(fit.head_mask)
  want = (np.asarray(alphas)[None, :, None, None, None]
          * np.where(mask, np.asarray(fit.sigma), 0.0)[:, None, :, :, None]
          * np.asarray(fit.directions)[:, None])
  np.testing.assert_allclose(steer, want, rtol=1e-6, atol=1e-7)
  assert not steer[:, :, ~mask.any(axis=0)].any()
  np.testing.assert_array_equal(steer[INVALID], 0.0)
  assert np.abs(steer[0, 1][mask[0]]).sum() > 0
  # Per-subject chosen alphas pick the matching slices.
  chosen = np.array([0, 5, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])
  got = pas_fit.steering_for_alpha(fit, alphas[chosen])
  assert got.shape == (12, LAYERS, HEADS, DIM)
  np.testing.assert_allclose(got, steer[np.arange(12), chosen], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pas_fit.steering_for_alpha(fit, 2.0), steer[:, 2], rtol=1e-6)


def test_subjects_alone_equal_the_batch(problem, fit):
  acts, answers = problem
  for s in [0, 3]:
    alone = pas_fit.fit_pas(jnp.asarray(acts), answers[s:s + 1], SETTINGS,
                            key=jax.random.key(0), subject_ids=[s])
    for name, got, want in zip(fit._fields, alone, fit, strict=True):
      np.testing.assert_allclose(got[0], want[s], rtol=0, atol=1e-4, err_msg=name)


def test_fit_pas_rejects_bad_input(problem):
  acts, answers = problem
  bad = acts.copy()
  bad[7, 0, 1, 2, 3] = np.inf
  key = jax.random.key(0)
  with pytest.raises(UserInputError, match="activations: item 7, version A, layer 1, head 2"):
    pas_fit.fit_pas(jnp.asarray(bad), answers, SETTINGS, key=key)
  with pytest.raises(UserInputError, match="known_answers: subject 0, item 0"):
    pas_fit.fit_pas(jnp.asarray(acts), np.full_like(answers, 7), SETTINGS, key=key)
  with pytest.raises(UserInputError, match="top_k"):
    pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS._replace(top_k=7), key=key)
  with pytest.raises(UserInputError, match="probe.val_fraction"):
    pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS._replace(val_fraction=1.0), key=key)
  with pytest.raises(UserInputError, match="probe.split_by"):
    pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS._replace(split_by="items"), key=key)


MESH_SCRIPT = """
import json
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from palign_jax.pas import fit as pas_fit
{problem}
SETTINGS = pas_fit.FitSettings(top_k=4, c=1.0, val_fraction=0.4, split_by="pairs", min_items=2,
                               max_iter=200, tol=1e-6)
acts, answers = make_problem({items}, {layers}, {heads}, {dim})
answers = np.concatenate([answers, answers[::-1]])  # 24 subjects, 3 per device
key = jax.random.key(0)
single = pas_fit.fit_pas(jnp.asarray(acts), answers, SETTINGS, key=key)
mesh = Mesh(np.array(jax.devices()), ("subjects",))
sharded_answers = jax.device_put(answers, NamedSharding(mesh, PartitionSpec("subjects")))
acts_everywhere = jax.device_put(acts, NamedSharding(mesh, PartitionSpec()))
sharded = pas_fit.fit_pas(acts_everywhere, sharded_answers, SETTINGS, key=key)
print(json.dumps({{
    "devices": len(jax.devices()),
    "mask_devices": len(sharded.head_mask.sharding.device_set),
    "single_devices": len(single.head_mask.sharding.device_set),
    "diff": {{name: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
              for name, a, b in zip(single._fields, single, sharded)}},
}}))
"""


def test_eight_devices_equal_one_device():
  script = MESH_SCRIPT.format(problem=textwrap.dedent(PROBLEM_SOURCE), items=ITEMS,
                              layers=LAYERS, heads=HEADS, dim=DIM)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["mask_devices"] == 8
  assert report["single_devices"] == 1
  for name, diff in report["diff"].items():
    assert diff <= 1e-4, (name, diff)
  assert report["diff"]["head_mask"] == 0 and report["diff"]["valid"] == 0
