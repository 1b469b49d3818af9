"""DPO on a mesh: the rows (adapters, optimizer state, minibatches) split over `data`.

A subprocess with 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`, set
before JAX starts, as in `test_parallel.py`) trains the same rows of `test_dpo`'s toy model
on one device, on a data=8 mesh (one row per device) and on a data=2 x model=4 mesh (3 rows
padded to 4, the base split over heads), records where every array lived, and compares the
results with the one-device run.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
import jax, jax.numpy as jnp, numpy as np
import test_dpo
from palign_jax import parallel
from palign_jax.dpo import lora
from palign_jax.dpo import train as dpo_train

assert len(jax.devices()) == 8
ROWS = [test_dpo.ROWS[r % 3] for r in range(8)]
SEEDS, RATES = list(range(20, 28)), [1e-2, 2e-2, 5e-3, 1e-2, 2e-2, 5e-3, 1e-2, 2e-2]
params, (_, _, pref) = test_dpo.model(), test_dpo.toy_preferences()
init = lora.init_adapters(jax.random.PRNGKey(9), test_dpo.CONFIG, rank=2,
                          targets=("q_proj", "v_proj", "o_proj"), lead=(8,))
seen = []  # per compiled chunk call: where its minibatch and its output adapters lived
real_chunk = dpo_train._train_chunk

def spec(x):  # the mesh axis of each dimension, trailing unsplit ones left off
  axes = list(getattr(x.sharding, "spec", ["one device"]))
  while axes and axes[-1] is None:
    axes.pop()
  return axes

def shards(x):
  return sorted((s.device.id, list(s.data.shape), str(s.index)) for s in x.addressable_shards)

def spy(*args, **kwargs):
  state, loss = real_chunk(*args, **kwargs)
  indices, a = args[6], state.adapters["q_proj"]["a"]
  seen.append({"indices_spec": spec(indices), "indices_shards": shards(indices),
               "a_spec": spec(a), "a_shards": shards(a),
               "mu_shards": shards(state.opt_state.mu["v_proj"]["b"])})
  return state, loss

dpo_train._train_chunk = spy

def run(mesh, rows, put_params):
  seen.clear()
  reference = dpo_train.reference_log_probs(params, test_dpo.CONFIG, pref)
  result = dpo_train.train(
      put_params(params), test_dpo.CONFIG, pref, reference,
      dpo_train.RowPairs.build([ROWS[r] for r in rows], 5),
      jax.tree.map(lambda x: x[np.array(rows)], init), test_dpo.SETTINGS,
      learning_rates=[RATES[r] for r in rows], seeds=[SEEDS[r] for r in rows], mesh=mesh)
  snap = result.snapshots["q_proj"]["a"]
  return {"loss": result.loss.tolist(), "stopped_at": result.stopped_at.tolist(),
          "snapshots": {t: {k: np.asarray(v).tolist() for k, v in f.items()}
                        for t, f in result.snapshots.items()},
          "snapshot_spec": spec(snap), "snapshot_shards": shards(snap),
          "chunks": list(seen)}

wide, tp = parallel.make_mesh(8, 1), parallel.make_mesh(2, 4)
out = {
    "one": run(None, list(range(8)), lambda p: jax.device_put(p, jax.devices()[0])),
    "8x1": run(wide, list(range(8)), lambda p: jax.tree.map(
        lambda x: parallel.replicate(wide, x), p)),
    "2x4": run(tp, [0, 1, 2], lambda p: parallel.shard_params(p, tp)),
}
pathlib = __import__("pathlib")
pathlib.Path(sys.argv[1]).write_text(json.dumps(out))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dpo_mesh")
  (folder / "worker.py").write_text(WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(folder / "worker.py"), str(folder / "out.json"),
                        str(ROOT)], env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  return json.loads((folder / "out.json").read_text())


def test_each_device_holds_and_trains_only_its_rows(runs):
  """data=8, 8 rows: every minibatch, adapter and optimizer-state leaf is split one row per
  device, into and out of each compiled chunk, and the snapshots stay split."""
  wide = runs["8x1"]
  assert len(wide["chunks"]) == 2  # max_steps 6 / eval_every 3
  for chunk in wide["chunks"]:
    assert chunk["indices_spec"] == [None, "data"]
    # indices [steps 3, rows 8, pairs 3]: device d holds row d's minibatches only
    assert [s[1] for s in chunk["indices_shards"]] == [[3, 1, 3]] * 8
    assert len({s[2] for s in chunk["indices_shards"]}) == 8  # 8 different slices
    assert chunk["a_spec"] == ["data"]
    assert [s[1] for s in chunk["a_shards"]] == [[1, 2, 32, 2]] * 8  # [rows, layers, in, rank]
    assert [s[1] for s in chunk["mu_shards"]] == [[1, 2, 2, 16]] * 8  # Adam's mu of v_proj b
  assert wide["snapshot_spec"] == ["data"]
  assert [s[1] for s in wide["snapshot_shards"]] == [[1, 3, 2, 32, 2]] * 8
  # One device: everything whole on it.
  assert [s[1] for s in runs["one"]["chunks"][0]["a_shards"]] == [[8, 2, 32, 2]]


def test_rows_padded_to_the_data_axis_and_base_split_over_model(runs):
  """data=2 x model=4, 3 rows: padded to 4 (2 per data shard, each copied over the 4 model
  devices); the result has the 3 real rows."""
  tp = runs["2x4"]
  for chunk in tp["chunks"]:
    assert [s[1] for s in chunk["a_shards"]] == [[2, 2, 32, 2]] * 8
    assert len({s[2] for s in chunk["a_shards"]}) == 2
  assert len(tp["loss"]) == 3 and tp["stopped_at"] == [-1, -1, -1]


@pytest.mark.parametrize("name,rows", [("8x1", list(range(8))), ("2x4", [0, 1, 2])])
def test_a_mesh_trains_what_one_device_does(runs, name, rows):
  """Rows are independent, so the split changes only float32 rounding (the model axis also
  reorders sums). Losses agree to 1e-5; adapters to 1e-4 relative plus 2e-5 absolute: Adam
  divides by the gradient's RMS, so a coordinate whose gradient is ~0 moves by up to the rate
  on rounding alone (as in test_dpo's vmapped-against-alone test)."""
  one, other = runs["one"], runs[name]
  np.testing.assert_allclose(other["loss"], np.asarray(one["loss"])[rows], rtol=1e-5, atol=1e-6)
  for target, factors in one["snapshots"].items():
    for k, value in factors.items():
      np.testing.assert_allclose(other["snapshots"][target][k], np.asarray(value)[rows],
                                 rtol=1e-4, atol=2e-5, err_msg=f"{name} {target} {k}")
  b = np.asarray(other["snapshots"]["v_proj"]["b"])
  assert np.abs(b[:, -1]).max(axis=(1, 2, 3)).min() > 1e-3  # every row really trained
