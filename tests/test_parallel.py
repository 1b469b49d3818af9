"""Scale-out: one mesh for parameters and batches, and several processes sharing subjects.

The mesh tests run in a subprocess with 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, which must be set before JAX starts) and compare
what each mesh shape computes with a one-device run. The multi-process tests start real
`launch.evaluate` processes joined by `jax.distributed` on loopback.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_run_config

from palign_jax import parallel
from palign_jax.errors import UserInputError

ROOT = pathlib.Path(__file__).resolve().parents[1]

MESH_WORKER = r'''
import json, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
from conftest import tiny_run_config
from palign_jax import data, parallel, planner
from palign_jax import engine as engine_lib
from palign_jax.models import loading
from palign_jax.protocol import alignment

model_dir, out = sys.argv[1], sys.argv[2]
subjects = data.parse_subject_spec("0:4", data.load_papi_subjects())
heldout = data.load_split().heldout[::15]
results, reference_acts = {}, None
for name, shape in [("1x1", (1, 1, False)), ("8x1_fsdp", (8, 1, True)), ("4x2", (4, 2, False))]:
  config = tiny_run_config(model_dir, **{"mesh.data": shape[0], "mesh.model": shape[1],
                                         "mesh.fsdp": shape[2], "subjects_per_batch": 4,
                                         "scoring.prefix_batch": 4})
  if name == "1x1":  # this process has 8 devices; the reference uses the first alone
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    model = loading.load_model(config.model, dtype=config.dtype,
                               shardings=lambda s: parallel.param_shardings(s, mesh))
    engine = engine_lib.Engine(model, question_batch=int(config.scoring.question_batch),
                               prefix_batch=int(config.scoring.prefix_batch), mesh=mesh)
  else:
    engine = engine_lib.Engine.from_config(config)
  params = engine.model.params
  acts = engine._compute_activations()  # on this mesh, not from the disk cache
  if reference_acts is None:
    reference_acts = acts
  settings = alignment.AlignSettings.from_config(config, 12)
  # Every mesh aligns from the same activations, so the comparison is of the sweep alone.
  aligned = alignment.align_subjects(engine, reference_acts, subjects, settings,
                                     selections=("kfold_known", "oracle_test"), heldout=heldout)
  q = params["layers"]["attn"]["qkv_proj"]["kernel"]
  embed = params["embed_tokens"]["embedding"]
  results[name] = {
      "q_spec": str(q.sharding.spec), "q_devices": len(q.sharding.device_set),
      "q_shard": list(q.addressable_shards[0].data.shape),
      "embed_shard": list(embed.addressable_shards[0].data.shape),
      "prefix_batch": engine.prefix_batch(100),
      "param_bytes": sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params)),
      "planned_param_bytes": planner.param_bytes_per_device(engine.config, 4, *shape),
      "acts": acts.tolist(),
      "chosen": [a.chosen_alpha for a in aligned],
      "heads": [a.head_mask.tolist() for a in aligned],
      "log_probs": [{str(k): v.tolist() for k, v in a.test_log_probs.items()} for a in aligned],
      "predictions": [a.predictions(a.chosen_alpha["kfold_known"]["median"], "median").tolist()
                      for a in aligned],
  }
pathlib = __import__("pathlib")
pathlib.Path(out).write_text(json.dumps(results))
'''


@pytest.fixture(scope="module")
def mesh_runs(tiny_model_dir, tmp_path_factory):
  folder = tmp_path_factory.mktemp("mesh")
  (folder / "worker.py").write_text(MESH_WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PALIGN_JAX_CACHE=str(folder / "cache"), JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(folder / "worker.py"), str(tiny_model_dir),
                        str(folder / "out.json"), str(ROOT)], env=env, capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  return json.loads((folder / "out.json").read_text())


def test_parameters_are_really_sharded(mesh_runs):
  one, fsdp, tp = mesh_runs["1x1"], mesh_runs["8x1_fsdp"], mesh_runs["4x2"]
  # q/k/v fused: [layers, hidden, kv_heads, groups + 2, head_dim]
  assert one["q_devices"] == 1 and one["q_shard"] == [3, 32, 2, 4, 8]
  # Tensor parallel: the 2 kv heads (each with its 2 query heads) over model=2, one group per
  # device; loaded from the orbax cache straight into these shardings (the 1x1 run wrote it).
  assert tp["q_devices"] == 8 and tp["q_shard"] == [3, 32, 1, 4, 8]
  assert "model" in tp["q_spec"]
  assert tp["embed_shard"] == [49152 // 2, 32]  # vocabulary over model
  # FSDP: the embedding axis (32) over data=8.
  assert fsdp["q_devices"] == 8 and fsdp["q_shard"] == [3, 4, 2, 4, 8]
  assert fsdp["embed_shard"] == [49152, 4]


@pytest.mark.parametrize("name", ["1x1", "8x1_fsdp", "4x2"])
def test_planner_knows_the_parameter_bytes_each_device_holds(mesh_runs, name):
  run = mesh_runs[name]
  assert run["planned_param_bytes"] == run["param_bytes"]


def test_prefix_batch_is_a_multiple_of_the_data_axis(mesh_runs):
  assert mesh_runs["1x1"]["prefix_batch"] == 4
  assert mesh_runs["8x1_fsdp"]["prefix_batch"] == 8  # 4 rounded up to whole devices
  assert mesh_runs["4x2"]["prefix_batch"] == 4


@pytest.mark.parametrize("name", ["8x1_fsdp", "4x2"])
def test_every_mesh_computes_what_one_device_does(mesh_runs, name):
  one, other = mesh_runs["1x1"], mesh_runs[name]
  # float32 sums split over devices add in another order: equal to ~1e-6 of the scale
  scale = np.abs(one["acts"]).max()
  np.testing.assert_allclose(other["acts"], one["acts"], rtol=0, atol=1e-5 * scale)
  assert other["chosen"] == one["chosen"]
  assert other["heads"] == one["heads"]
  assert other["predictions"] == one["predictions"]
  for mine, theirs in zip(other["log_probs"], one["log_probs"], strict=True):
    assert mine.keys() == theirs.keys()
    for alpha in mine:
      np.testing.assert_allclose(mine[alpha], theirs[alpha], rtol=1e-4, atol=1e-4)


def test_bad_mesh_shapes_are_refused():
  import jax
  devices = jax.devices()[:1] * 1
  with pytest.raises(UserInputError, match="data=2 x model=1 = 2 devices, but this process has 1"):
    parallel.make_mesh(2, 1, devices)
  with pytest.raises(UserInputError, match="config.mesh.model=3 does not divide the 1 devices"):
    parallel.make_mesh(-1, 3, devices)
  with pytest.raises(UserInputError, match="must be >= 1"):
    parallel.make_mesh(0, 1, devices)


def test_subjects_are_split_evenly_and_stably():
  ids = [str(i) for i in range(7)]
  shares = [parallel.subjects_of_process(ids, p, 3) for p in range(3)]
  assert sorted(sum(shares, [])) == sorted(ids)
  assert [len(s) for s in shares] == [3, 2, 2]
  assert parallel.subjects_of_process(ids, 0, 1) == ids


# --- several processes ------------------------------------------------------------------------

METHODS = "few_shot,pas,constant_3"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _evaluate_args(model_dir, out, port=None, process=0, processes=1):
  config = tiny_run_config(model_dir)
  args = [sys.executable, "-m", "launch.evaluate", f"--model={model_dir}", "--subjects=0:4",
          f"--methods={METHODS}", f"--output_dir={out}", "--config.plots=False",
          f"--config.pas.top_k={config.pas.top_k}", "--config.pas.alphas=(0.0,4.0)",
          "--config.pas.folds=2", "--config.subjects_per_batch=1",
          "--config.scoring.question_batch=32", "--config.scoring.prefix_batch=2"]
  if processes > 1:
    args += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             f"--config.distributed.num_processes={processes}",
             f"--config.distributed.process_id={process}", "--config.distributed.timeout_s=120"]
  return args


def _start(args, cache):
  env = dict(os.environ, PALIGN_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=900):
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, err[-4000:]
  return out, err


def _records(folder):
  records = {}
  for path in pathlib.Path(folder).glob("records*.jsonl"):
    for line in path.read_text().splitlines():
      r = json.loads(line)
      records[(r["subject"], r["method"])] = r
  return records


def _predictions(records):
  return {key: {d: e["predictions"] for d, e in r["decodings"].items()}
          for key, r in records.items()}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
  folder = tmp_path_factory.mktemp("one_process")
  _finish(_start(_evaluate_args(tiny_model_dir, folder / "out"), folder / "cache"))
  return folder / "out"


def test_two_processes_merge_to_the_one_process_result(tiny_model_dir, tmp_path, one_process):
  port, out = _free_port(), tmp_path / "out"
  running = [_start(_evaluate_args(tiny_model_dir, out, port, p, 2), tmp_path / "cache")
             for p in range(2)]
  for p in running:
    _finish(p)
  shards = sorted(x.name for x in out.glob("records*.jsonl"))
  assert shards == ["records.process-0-of-2.jsonl", "records.process-1-of-2.jsonl"]
  subjects_by_shard = [{json.loads(line)["subject"] for line in (out / s).read_text().splitlines()}
                       for s in shards]
  assert not subjects_by_shard[0] & subjects_by_shard[1]  # each subject on one process only
  assert _predictions(_records(out)) == _predictions(_records(one_process))
  merged = json.loads((out / "results.json").read_text())
  alone = json.loads((one_process / "results.json").read_text())
  assert merged["subjects_missing"] == [] and merged["run"]["processes"] == 2
  assert merged["methods"].keys() == alone["methods"].keys()
  for method, row in alone["methods"].items():
    for field in ("mean", "ci_low", "ci_high", "n_subjects", "n_missing_answers"):
      assert merged["methods"][method][field] == pytest.approx(row[field], abs=1e-9), method


def test_a_killed_process_resumes_only_its_missing_subjects(tiny_model_dir, tmp_path,
                                                            one_process):
  port, out = _free_port(), tmp_path / "out"
  cache = tmp_path / "cache"
  running = [_start(_evaluate_args(tiny_model_dir, out, port, p, 2), cache) for p in range(2)]
  shard = out / "records.process-1-of-2.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline:  # kill process 1 once it has finished some LLM work
    done = shard.read_text().count('"method": "pas"') if shard.exists() else 0
    if done >= 1 or running[1].poll() is not None:
      break
    time.sleep(0.2)
  running[1].send_signal(signal.SIGKILL)
  running[1].communicate()
  _finish(running[0])  # the survivor finishes its own share
  before = _records(out)
  share_1 = set(parallel.subjects_of_process([str(s) for s in _subject_ids()], 1, 2))
  finished_1 = {k for k in before if k[0] in share_1}
  assert any(m == "pas" for _, m in finished_1), "process 1 was killed before finishing work"
  partial = json.loads((out / "results.json").read_text())
  assert partial["subjects_missing"], "the report must say a share is missing"

  # Restart process 1 alone (as one process of two, joined by a fresh process 0 that finds
  # its share done): only the missing records are computed, the finished ones are kept.
  port = _free_port()
  restarted = [_start(_evaluate_args(tiny_model_dir, out, port, p, 2), cache) for p in range(2)]
  for p in restarted:
    _finish(p)
  after = _records(out)
  for key in before:
    assert after[key] == before[key]  # nothing finished was redone or lost
  assert _predictions(after) == _predictions(_records(one_process))
  log = (out / "records.process-1-of-2.jsonl").read_text().splitlines()
  assert len(log) == len({(json.loads(x)["subject"], json.loads(x)["method"]) for x in log})
  final = json.loads((out / "results.json").read_text())
  assert final["subjects_missing"] == []


def _subject_ids():
  from palign_jax import data
  return data.parse_subject_spec("0:4", data.load_papi_subjects()).ids


def test_processes_running_different_configs_are_refused(tiny_model_dir, tmp_path):
  port, out = _free_port(), tmp_path / "out"
  args = [_evaluate_args(tiny_model_dir, out, port, p, 2) for p in range(2)]
  args[1].append("--config.seed=7")
  running = [_start(a, tmp_path / "cache") for a in args]
  errors = [p.communicate(timeout=600)[1] for p in running]
  assert all(p.returncode != 0 for p in running)
  assert any("run another configuration or model than process 0" in e for e in errors), errors
  assert not any("Traceback" in e for e in errors)
