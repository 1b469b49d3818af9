"""Tests of the resumable result store and of the plots."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from palign_jax import data, store
from palign_jax.errors import UserInputError
from palign_jax.evaluation import metrics, plots


def test_round_trip_and_resume(tmp_path):
  s = store.ResultStore(tmp_path, {"model": "m1", "seed": 0})
  s.append({"subject": "1", "method": "few_shot", "errors": [1, 2]})
  again = store.ResultStore(tmp_path, {"model": "m1", "seed": 0})
  assert again.has("1", "few_shot") and not again.has("1", "pas")
  assert again.get("1", "few_shot")["errors"] == [1, 2]


def test_refuses_other_configuration(tmp_path):
  store.ResultStore(tmp_path, {"model": "m1", "seed": 0}).append({"subject": "1", "method": "x"})
  before = (tmp_path / store.RECORDS_FILE).read_bytes()
  with pytest.raises(UserInputError, match="another model or configuration.*model"):
    store.ResultStore(tmp_path, {"model": "m2", "seed": 0})
  assert (tmp_path / store.RECORDS_FILE).read_bytes() == before  # nothing overwritten


def test_partial_last_line_is_dropped_not_corrupting(tmp_path):
  s = store.ResultStore(tmp_path, {"v": 1})
  s.append({"subject": "1", "method": "a"})
  with open(tmp_path / store.RECORDS_FILE, "ab") as f:
    f.write(b'{"subject": "2", "meth')  # killed mid-write
  again = store.ResultStore(tmp_path, {"v": 1})
  assert again.has("1", "a") and not again.has("2", "a")
  again.append({"subject": "2", "method": "a"})
  lines = (tmp_path / store.RECORDS_FILE).read_text().splitlines()
  assert [json.loads(x)["subject"] for x in lines] == ["1", "2"]


def test_kill_9_between_and_during_writes(tmp_path):
  # A child appends records forever; we SIGKILL it at an arbitrary moment, then reopen.
  script = textwrap.dedent(f"""
      from palign_jax import store
      s = store.ResultStore({str(tmp_path)!r}, {{"v": 1}})
      for i in range(10**9):
        s.append({{"subject": str(i), "method": "m", "payload": "x" * 5000}})
  """)
  proc = subprocess.Popen([sys.executable, "-c", script])
  path = tmp_path / store.RECORDS_FILE
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
      if path.exists() and path.stat().st_size > 200_000:
        break
      time.sleep(0.02)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  s = store.ResultStore(tmp_path, {"v": 1})
  subjects = sorted(int(r["subject"]) for r in s.records())
  assert subjects == list(range(len(subjects))) and len(subjects) > 0
  for line in (tmp_path / store.RECORDS_FILE).read_text().splitlines():
    json.loads(line)  # every line left is a whole record


def test_trait_scores_against_loop():
  items = data.load_items()
  heldout = data.load_split().heldout
  answers = np.random.default_rng(0).integers(0, 6, size=(3, len(heldout)))
  got = plots.trait_scores(answers, heldout)
  for s in range(3):
    for t in range(5):
      vals = [(a if items.keyed[j] > 0 else 6 - a) for a, j in zip(answers[s], heldout, strict=True)
              if a > 0 and items.trait[j] == t]
      np.testing.assert_allclose(got[s, t], np.mean(vals))


def test_plots_are_written(tmp_path):
  errors = np.random.default_rng(0).uniform(0.3, 1.0, size=(10, 5))
  result = metrics.SubjectErrors(tuple(map(str, range(10))), errors, np.zeros(10, int),
                                 np.zeros(10, int))
  summary = metrics.summarize(result, n_bootstrap=100)
  plots.plot_errors({"a": summary, "b": summary}, tmp_path / "e.png")
  plots.plot_profile("1", {"person": np.full(5, 3.0), "model": np.arange(1, 6.0)},
                     tmp_path / "p.png")
  for name in ("e.png", "p.png"):
    content = (tmp_path / name).read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5000
