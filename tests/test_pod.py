"""Pod mode: two processes x 4 simulated CPU devices as one global 8-device mesh (JAX's CPU
collectives across processes, gloo), running `launch.evaluate` as one SPMD program.

Marked slow (each run starts two JAX processes; about 3-5 minutes apiece on 2 cores): CI runs
them with the real-model tests (`bash scripts/test.sh -m slow`).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import test_parallel as independent  # the multi-process harness of the independent mode

pytestmark = pytest.mark.slow

POD_WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/tests"]
from conftest import tiny_run_config
from launch import common
from palign_jax import engine as engine_lib, parallel
import jax
config = tiny_run_config(sys.argv[1], **{"mesh.data": 4, "mesh.model": 2,
                                         "distributed.mode": "pod",
                                         "distributed.coordinator_address": sys.argv[2],
                                         "distributed.num_processes": 2,
                                         "distributed.process_id": int(sys.argv[3])})
process, processes = common.init_distributed(config)
engine = engine_lib.Engine.from_config(config)
qkv = engine.model.params["layers"]["attn"]["qkv_proj"]["kernel"]
answers = parallel.put_batch(engine.mesh, __import__("numpy").arange(8 * 3).reshape(8, 3))
print("POD", json.dumps({
    "process": process, "processes": processes, "mesh_devices": engine.mesh.devices.size,
    "mesh_processes": sorted({d.process_index for d in engine.mesh.devices.flat}),
    "qkv_local_shards": len(qkv.addressable_shards),
    "qkv_shard": list(qkv.addressable_shards[0].data.shape),
    "qkv_fully_addressable": qkv.is_fully_addressable,
    "answer_rows_here": sorted(int(s.data[0, 0]) // 3 for s in answers.addressable_shards),
}), flush=True)
'''


def _pod_env(cache):
  env = dict(os.environ, PALIGN_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return env


def _pod_args(model_dir, out, port, process):
  return independent._evaluate_args(model_dir, out, port, process, 2) + [
      "--config.distributed.mode=pod", "--config.mesh.data=4", "--config.mesh.model=2"]


def _start_pod(model_dir, out, cache, port=None):
  port = port or independent._free_port()
  return [subprocess.Popen(_pod_args(model_dir, out, port, p), cwd=independent.ROOT,
                           env=_pod_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for p in range(2)]


def _finish_all(running, timeout=900):
  return [independent._finish(p, timeout) for p in running]


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
  """The same run on one device, and on one process with 8 devices (4 x 2 mesh)."""
  folder = tmp_path_factory.mktemp("pod_references")
  independent._finish(independent._start(
      independent._evaluate_args(tiny_model_dir, folder / "one"), folder / "cache"))
  env = dict(_pod_env(folder / "cache"), XLA_FLAGS="--xla_force_host_platform_device_count=8")
  eight = subprocess.Popen(independent._evaluate_args(tiny_model_dir, folder / "eight") + [
      "--config.mesh.data=4", "--config.mesh.model=2"], cwd=independent.ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  independent._finish(eight)
  return {"one": independent._records(folder / "one"),
          "eight": independent._records(folder / "eight")}


def _close(mine, theirs, where):
  """Equal structure and text; numbers to float32 sums' reordering (1e-4 relative)."""
  if isinstance(theirs, dict):
    assert mine.keys() == theirs.keys(), where
    for k in theirs:
      _close(mine[k], theirs[k], f"{where}.{k}")
  elif isinstance(theirs, list):
    assert len(mine) == len(theirs), where
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
      _close(a, b, f"{where}[{i}]")
  elif isinstance(theirs, float):
    assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-7), where
  else:
    assert mine == theirs, where


def _same_results(mine, theirs):
  assert mine.keys() == theirs.keys()
  assert independent._predictions(mine) == independent._predictions(theirs)
  for key, record in theirs.items():
    if key[1] == "pas":  # the chosen alphas, and every number the choice was made on
      assert mine[key]["alpha"] == record["alpha"], key
      _close(mine[key]["selection"], record["selection"], f"{key}.selection")


def test_parameters_and_subjects_are_split_across_the_two_processes(tiny_model_dir, tmp_path):
  (tmp_path / "worker.py").write_text(POD_WORKER)
  address = f"127.0.0.1:{independent._free_port()}"
  running = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tiny_model_dir),
                               address, str(p), str(independent.ROOT)],
                              env=_pod_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
  reports = []
  for out, _ in _finish_all(running, timeout=600):
    (line,) = [x for x in out.splitlines() if x.startswith("POD ")]
    reports.append(json.loads(line[4:]))
  for p, report in enumerate(reports):
    assert report["process"] == p and report["processes"] == 2
    assert report["mesh_devices"] == 8 and report["mesh_processes"] == [0, 1]
    # q/k/v over model=2 within a host; this process holds 4 of the 8 shards only.
    assert report["qkv_local_shards"] == 4 and not report["qkv_fully_addressable"]
    assert report["qkv_shard"] == [3, 32, 1, 4, 8]
  # 8 rows over data=4 (2 devices of each process per data index pair): each process holds
  # only its half of the rows.
  assert sorted(reports[0]["answer_rows_here"]) != sorted(reports[1]["answer_rows_here"])
  assert not set(reports[0]["answer_rows_here"]) & set(reports[1]["answer_rows_here"])


def test_a_pod_computes_what_one_process_and_one_device_do(tiny_model_dir, tmp_path,
                                                          references):
  out = tmp_path / "out"
  logs = _finish_all(_start_pod(tiny_model_dir, out, tmp_path / "cache"))
  assert sorted(x.name for x in out.glob("records*.jsonl")) == ["records.jsonl"]  # process 0
  assert "process 0 wrote the records" in logs[1][0]
  records = independent._records(out)
  _same_results(records, references["eight"])
  _same_results(records, references["one"])
  report = json.loads((out / "results.json").read_text())
  assert report["subjects_missing"] == [] and report["run"]["mode"] == "pod"


def test_a_pod_stops_when_a_process_dies_and_resumes_only_what_is_missing(
    tiny_model_dir, tmp_path, references):
  out, cache = tmp_path / "out", tmp_path / "cache"
  running = _start_pod(tiny_model_dir, out, cache)
  records_file = out / "records.jsonl"
  deadline = time.time() + 900
  while time.time() < deadline:  # kill process 1 once some LLM work is written
    done = records_file.read_text().count('"method": "pas"') if records_file.exists() else 0
    if done >= 1 or running[1].poll() is not None:
      break
    time.sleep(0.2)
  running[1].send_signal(signal.SIGKILL)
  running[1].communicate()
  try:  # the survivor cannot go on alone: JAX stops it (or it waits forever: stop it)
    running[0].communicate(timeout=180)
  except subprocess.TimeoutExpired:
    running[0].kill()
    running[0].communicate()
  before = independent._records(out)
  assert any(m == "pas" for _, m in before), "process 1 was killed before any LLM record"
  assert len(before) < len(references["one"]), "the run finished before the kill"

  _finish_all(_start_pod(tiny_model_dir, out, cache))
  after = independent._records(out)
  for key in before:
    assert after[key] == before[key]  # nothing finished was redone or lost
  lines = records_file.read_text().splitlines()
  assert len(lines) == len(after)  # nothing written twice
  _same_results(after, references["one"])


def test_a_pod_refuses_processes_with_different_configs(tiny_model_dir, tmp_path):
  port = independent._free_port()
  args = [_pod_args(tiny_model_dir, tmp_path / "out", port, p) for p in range(2)]
  args[1].append("--config.seed=7")
  running = [subprocess.Popen(a, cwd=independent.ROOT, env=_pod_env(tmp_path / "cache"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in args]
  errors = [p.communicate(timeout=600)[1] for p in running]
  assert all(p.returncode != 0 for p in running)
  assert any("run another configuration or model than process 0" in e for e in errors), errors
  assert not any("Traceback" in e for e in errors)


def test_align_in_a_pod_saves_what_one_process_saves(tiny_model_dir, tmp_path):
  """`launch.align` in pod mode: the same records (alphas, kept heads, predictions) as one
  process on one device, one copy of each profile, written by process 0."""
  args = [sys.executable, "-m", "launch.align", f"--model={tiny_model_dir}", "--subjects=0:2",
          "--config.pas.top_k=6", "--config.pas.alphas=(0.0,4.0)", "--config.pas.alpha_grid=fixed",
          "--config.pas.folds=2", "--config.subjects_per_batch=2",
          "--config.scoring.question_batch=32", "--config.scoring.prefix_batch=2"]
  independent._finish(independent._start(args + [f"--output_dir={tmp_path / 'one'}"],
                                         tmp_path / "cache"))
  port = independent._free_port()
  pod = [subprocess.Popen(args + [
      f"--output_dir={tmp_path / 'pod'}", "--config.distributed.mode=pod",
      "--config.mesh.data=4", "--config.mesh.model=2",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={p}",
      "--config.distributed.timeout_s=120"], cwd=independent.ROOT,
      env=_pod_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for p in range(2)]
  outputs = [out for out, _ in _finish_all(pod)]
  one, mine = independent._records(tmp_path / "one"), independent._records(tmp_path / "pod")
  assert mine.keys() == one.keys() and len(mine) == 2
  for key, record in one.items():
    assert mine[key]["alpha"] == record["alpha"] and mine[key]["heads"] == record["heads"]
    assert independent._predictions({key: mine[key]}) == independent._predictions({key: record})
    _close(mine[key]["sigma"], record["sigma"], f"{key}.sigma")
  assert sorted(p.name for p in (tmp_path / "pod" / "profiles").iterdir()) == sorted(
      p.name for p in (tmp_path / "one" / "profiles").iterdir())
  assert all("alpha=" in out for out in outputs)  # every process can say what was aligned
