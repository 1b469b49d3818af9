"""End-to-end: engine, PAS search, evaluation, alignment profiles and chat on a tiny model."""

import json
import subprocess
import sys

import numpy as np
import pytest

from palign_jax import data, engine, prompts, scoring
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods, store
from palign_jax.pas import search

SETTINGS = search.PasSettings(top_k=6, alphas=(0.0, 4.0, 16.0), folds=2, seed=0)
# A slice of the held-out items keeps the sweep tests fast; the evaluation test uses all 180.
HELDOUT = data.load_split().heldout[::6]


def test_prefix_shared_engine_scores_equal_full_prompts(tiny_engine):
  systems = [prompts.DEFAULT_SYSTEM_PROMPT, prompts.few_shot_system_prompt(
      data.known_answers(data.load_papi_subjects())[0])]
  items = data.load_split().heldout[:5]
  shared = tiny_engine.score(systems, items)
  full = [prompts.encode_question(tiny_engine.model.tokenizer, s, data.load_items().text[j])
          for s in systems for j in items]
  reference = scoring.score_full_prompts(
      tiny_engine.model.params, tiny_engine.config, [p.prefix + p.suffix for p in full],
      tiny_engine.option_ids)
  np.testing.assert_allclose(shared.reshape(-1, 5), reference, atol=2e-4)


def test_activations_are_cached_and_checked(tiny_engine, tmp_path):
  activations = tiny_engine.activations()
  assert activations.shape == (120, 2, 3, 4, 8) and np.isfinite(activations).all()
  assert not np.allclose(activations[:, 0], activations[:, 1])  # A and E differ
  path = tiny_engine._activations_path()
  np.testing.assert_array_equal(engine.load_activations(path, tiny_engine.fingerprint),
                                activations)
  with pytest.raises(UserInputError, match="another|not"):
    engine.load_activations(path, "someothermodel00")
  bad = tmp_path / "nan"
  engine.save_activations(bad, np.full((2, 2), np.nan, np.float32), "f")
  with pytest.raises(UserInputError, match="NaN"):
    engine.load_activations(bad, "f")


def _sweep(tiny_engine, known, ids, **kwargs):
  return search.run_sweep(tiny_engine.score, tiny_engine.activations(), known, SETTINGS,
                          subject_ids=ids, heldout=HELDOUT, **kwargs)


@pytest.fixture(scope="module")
def two_subjects():
  return data.load_papi_subjects().select(["172481", data.load_papi_subjects().ids[1]])


@pytest.fixture(scope="module")
def batch_sweep(tiny_engine, two_subjects):
  return _sweep(tiny_engine, data.known_answers(two_subjects).astype(np.int64), two_subjects.ids)


def test_sweep_shapes_and_batch_equals_single(tiny_engine, two_subjects, batch_sweep):
  assert batch_sweep.test_log_probs.shape == (2, 3, len(HELDOUT), 5)
  assert batch_sweep.validation_error["argmax"].shape == (2, 3)
  alone = _sweep(tiny_engine, data.known_answers(two_subjects)[1:].astype(np.int64),
                 two_subjects.ids[1:])
  np.testing.assert_allclose(alone.test_log_probs[0], batch_sweep.test_log_probs[1], atol=1e-4)
  np.testing.assert_allclose(alone.validation_error["argmax"][0],
                             batch_sweep.validation_error["argmax"][1])
  # Steering changes the answers' distribution (alpha 16 vs 0).
  assert not np.allclose(batch_sweep.test_log_probs[:, 0], batch_sweep.test_log_probs[:, 2])


def test_honest_selection_never_reads_test_answers(tiny_engine, two_subjects, batch_sweep):
  changed = two_subjects.answers.copy()
  heldout = data.load_split().heldout
  changed[:, heldout] = 6 - np.maximum(changed[:, heldout], 1)
  # The sweep only receives known answers; its choice must not move with the test answers.
  records = methods.sweep_records(batch_sweep, two_subjects, ["pas", "pas_oracle_test"],
                                  SETTINGS, 0.0)
  records_changed = methods.sweep_records(
      batch_sweep, data.Subjects(two_subjects.ids, changed), ["pas", "pas_oracle_test"],
      SETTINGS, 0.0)
  for a, b in zip(records, records_changed, strict=True):
    if a["method"] == "pas":
      assert a["alpha"] == b["alpha"]
  oracle = [r for r in records if r["method"] == "pas_oracle_test"]
  for r in oracle:  # the oracle picks the minimum of the test error, by definition
    for d in search.DECODINGS:
      errors = r["test_error_by_alpha"][d]
      assert r["decodings"][d]["sum"] == pytest.approx(min(errors))


def test_all_neutral_subject_gets_alpha_zero(tiny_engine):
  known = np.full((1, 120), 3, np.int64)
  sweep = _sweep(tiny_engine, known, ["neutral"])
  assert not bool(sweep.fit.valid[0])
  assert np.isfinite(sweep.test_log_probs).all()
  np.testing.assert_allclose(sweep.test_log_probs[0, 0], sweep.test_log_probs[0, -1])
  assert (sweep.chosen_alpha_index("argmax") == 0).all()


def _config(tiny_model_dir, **overrides):
  from configs import default
  config = default.get_config()
  config.model = str(tiny_model_dir)
  config.subjects = "0:2"
  config.subjects_per_batch = 2
  config.pas.top_k = 6
  config.pas.alphas = (0.0, 4.0)
  config.pas.folds = 2
  config.scoring.question_batch = 32
  config.plots = True
  for key, value in overrides.items():
    config[key] = value
  return config


def test_evaluate_resumes_and_reports_agree(tiny_model_dir, tmp_path, monkeypatch):
  from launch import evaluate
  out = tmp_path / "run"
  results = evaluate.run(_config(tiny_model_dir), str(out))
  records = [json.loads(line) for line in (out / store.RECORDS_FILE).read_text().splitlines()]
  expected_methods = set(_config(tiny_model_dir).methods.split(","))
  assert {r["method"] for r in records} == expected_methods
  assert len(records) == 2 * len(expected_methods)
  # The report is computed from the records.
  for record_method in ("few_shot", "ridge_cv"):
    sums = [r["decodings"][next(iter(r["decodings"]))]["sum"] for r in records
            if r["method"] == record_method]
    assert results["methods"][record_method]["mean"]["sum"] == pytest.approx(np.mean(sums))
  assert "pas_oracle_test" in (out / "results.md").read_text()
  for png in ("errors_by_trait.png", "profile_first_subject.png"):
    assert (out / png).stat().st_size > 5000
  # Interrupted mid-write: drop the last record and leave half a line behind.
  lines = (out / store.RECORDS_FILE).read_bytes().splitlines(keepends=True)
  (out / store.RECORDS_FILE).write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
  calls = []
  original = methods.llm_records
  monkeypatch.setattr(methods, "llm_records",
                      lambda *a, **k: calls.append(a[3]) or original(*a, **k))
  evaluate.run(_config(tiny_model_dir), str(out))
  again = [json.loads(line) for line in (out / store.RECORDS_FILE).read_text().splitlines()]
  assert len(again) == len(records)  # recomputed only what was missing
  assert len(calls) <= 1 and all(len(c) == 1 for c in calls)
  with pytest.raises(UserInputError, match="another model or configuration"):
    evaluate.run(_config(tiny_model_dir, seed=1), str(out))


def test_evaluate_cli_bad_input_is_one_line(tmp_path):
  for flags, message in ((["--methods=nope"], "unknown method"),
                         (["--subjects=nobody", "--methods=constant_3"], "unknown subject")):
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--output_dir={tmp_path}"]
                          + flags, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_align_and_chat_cli(tiny_model_dir, tmp_path):
  out = tmp_path / "align"
  common = [f"--model={tiny_model_dir}", "--top_k=4", "--alphas=0,8", "--folds=2"]
  proc = subprocess.run([sys.executable, "-m", "launch.align", "--subjects=examples/my_answers.csv",
                         f"--output_dir={out}"] + common, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "subject me: alpha=" in proc.stdout
  record = json.loads((out / store.RECORDS_FILE).read_text())
  assert record["alpha_selection"].startswith("kfold_known") and len(record["heads"]) == 4
  profile = out / "profiles" / "me"
  proc = subprocess.run([sys.executable, "-m", "launch.chat", f"--model={tiny_model_dir}",
                         f"--profile={profile}", "--prompt=Hello there", "--max_new_tokens=4",
                         "--inventory"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- unaligned ---" in proc.stdout and "aligned model" in proc.stdout
  assert "Extraversion" in proc.stdout
