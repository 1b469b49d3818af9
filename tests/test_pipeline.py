"""End to end on a tiny model: engine, the PAS protocol, evaluation, profiles and chat."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_run_config

from palign_jax import data, engine, prompts, readout, scoring, store
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods
from palign_jax.pas import fit as pas_fit
from palign_jax.protocol import alignment

# A slice of the held-out items keeps the alignment tests fast; the evaluation tests use all.
HELDOUT = data.load_split().heldout[::6]


def settings_for(tiny_engine, **overrides):
  config = tiny_run_config("unused", **overrides)
  c = tiny_engine.config
  return alignment.AlignSettings.from_config(config, c.num_layers * c.num_heads)


@pytest.fixture(scope="module")
def two_subjects():
  papi = data.load_papi_subjects()
  return papi.select(["172481", papi.ids[1]])


def stored(directory):
  """The result store an evaluate/align run left in `directory`."""
  return store.ResultStore(directory, json.loads((directory / store.RUN_FILE).read_text()))


def with_heldout_answers_changed(subjects):
  answers = subjects.answers.copy()
  heldout = data.load_split().heldout
  # A rotation (1->2, ..., 5->1), not a mirror: |3 - a| changes too, so even an all-3 prediction
  # scores differently.
  answers[:, heldout] = np.where(answers[:, heldout] > 0, answers[:, heldout] % 5 + 1, 4)
  return data.Subjects(subjects.ids, answers)


def test_context_shared_engine_scores_equal_full_prompts(tiny_engine):
  systems = [prompts.DEFAULT_SYSTEM_PROMPT, prompts.few_shot_system_prompt(
      data.known_answers(data.load_papi_subjects())[0])]
  items = data.load_split().heldout[:5]
  shared = tiny_engine.score_systems(systems, items)
  full = [prompts.encode_question(tiny_engine.model.tokenizer, s, data.load_items().text[j])
          for s in systems for j in items]
  reference = scoring.score_full_prompts(
      tiny_engine.model.params, tiny_engine.config, [p.prefix + p.suffix for p in full],
      tiny_engine.option_ids)
  np.testing.assert_allclose(shared.reshape(-1, 5), reference, atol=2e-4)


def test_question_head_moves_into_the_context_token_exactly(tiny_engine):
  """Every question turn starts with the same tokens; they are encoded with the context, and
  context + question is still exactly the tokenised conversation."""
  head = tiny_engine.question_head
  assert len(head) >= 5
  tokenizer = tiny_engine.model.tokenizer
  assert tokenizer.decode(head).startswith("<|im_start|>user")
  text = data.load_items().text
  for j in (0, 57, 299):
    whole = prompts.encode_question(tokenizer, "Be brief.", text[j])
    joined = list(tiny_engine.context_tokens("Be brief.")) + list(
        tiny_engine.question_tokens([j])[0])
    assert joined == whole.prefix + whole.suffix


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


def align(tiny_engine, subjects, selections=("kfold_known",), **overrides):
  return alignment.align_subjects(
      tiny_engine, tiny_engine.activations(), subjects,
      settings_for(tiny_engine, **overrides), selections=selections, heldout=HELDOUT)


@pytest.fixture(scope="module")
def both(tiny_engine, two_subjects):
  return align(tiny_engine, two_subjects, ("kfold_known", "oracle_test"),
               **{"pas.alphas": (0.0, 4.0, 16.0)})


def test_batch_equals_each_subject_alone(tiny_engine, two_subjects, both):
  alone = align(tiny_engine, two_subjects.select([two_subjects.ids[1]]),
                ("kfold_known", "oracle_test"), **{"pas.alphas": (0.0, 4.0, 16.0)})[0]
  together = both[1]
  assert alone.chosen_alpha == together.chosen_alpha
  np.testing.assert_array_equal(alone.head_mask, together.head_mask)
  np.testing.assert_allclose(alone.fold_error["argmax"], together.fold_error["argmax"])
  for a in together.test_log_probs:
    np.testing.assert_allclose(alone.test_log_probs[a], together.test_log_probs[a], atol=1e-4)
  # Steering moves the answers' distribution (alpha 16 vs 0).
  assert np.abs(together.test_log_probs[16.0] - together.test_log_probs[0.0]).max() > 1e-3


def test_oracle_picks_the_lowest_test_error(both):
  for result in both:
    for decoding, by_alpha in result.test_error.items():
      best = min(by_alpha, key=lambda a: (by_alpha[a], a))
      assert result.chosen_alpha["oracle_test"][decoding] == best
    assert sorted(result.test_log_probs) == [0.0, 4.0, 16.0]  # the oracle scores every alpha


def test_pays_only_for_what_is_asked(tiny_engine, two_subjects, monkeypatch):
  """The honest path scores alpha 0 with the full fit and each subject's chosen alpha with its
  fold fits on the test items, not every alpha; the work record says what was done."""
  calls = []
  original = tiny_engine.score
  monkeypatch.setattr(tiny_engine, "score", lambda *a, **k: calls.append(
      (len(a[1]), k.get("pairs"))) or original(*a, **k))
  results = align(tiny_engine, two_subjects, **{"pas.alphas": (0.0, 4.0, 16.0)})
  fold_calls, test_calls = calls[:2], calls[2:]
  assert len(fold_calls) == 2 and all(pairs is None for _, pairs in fold_calls)  # all alphas
  full_sweep = test_calls[0]
  assert full_sweep[0] == len(HELDOUT)
  steered = [s for s, r in enumerate(results) if r.chosen_alpha["kfold_known"]["argmax"] > 0]
  crossfit_calls = test_calls[1:]  # every fold fit of each steered subject, in one call
  assert len(crossfit_calls) == (1 if steered else 0)
  for n, pairs in crossfit_calls:
    assert n == len(HELDOUT) and pairs.tolist() == [[s, f] for s in steered for f in (0, 1)]
  for s, result in enumerate(results):
    chosen = set(result.chosen_alpha["kfold_known"].values())
    assert set(result.test_log_probs) == {0.0}
    assert {float(result.alphas[a]) for c, a in full_sweep[1] if c == s} == {0.0}
    assert set(result.crossfit_log_probs) == chosen
    assert result.work["test_alphas"] == [0.0] and result.work["folds"] == 2
    assert {"probes", "fold_probes", "fold_sweep", "test_sweep"} <= set(
        result.work["stage_seconds"])
    assert "oracle_test" not in result.chosen_alpha and not result.test_error == {}


def test_crossfit_row_is_the_fold_fits_average(tiny_engine, two_subjects):
  """The honest row at a steered alpha is the mean of the fold fits' distributions at that
  alpha, each scored under the context of all known answers (checked in float64 numpy)."""
  settings = settings_for(tiny_engine, **{"pas.alphas": (0.0, 16.0)})
  known = data.known_answers(two_subjects).astype(np.int32)
  fold = alignment.fold_of_known_items(settings.folds, settings.seed)
  fits = [pas_fit.fit_pas(tiny_engine.activations(), np.where(fold == f, 0, known),
                          settings.fit, key=jax.random.PRNGKey(f)) for f in range(2)]
  alphas = np.array([0.0, 16.0], np.float32)
  zero_rows = [{0.0: np.zeros((len(HELDOUT), 5), np.float32)} for _ in known]
  zero_priors = [{0.0: np.zeros(5)} for _ in known]
  log_probs, priors = alignment._crossfit_rows(
      tiny_engine, alignment._Stages(lambda _: None), known, HELDOUT, fits,
      [("argmax", 1), ("argmax", 0)], alphas, 0, zero_rows, zero_priors)
  assert set(log_probs[1]) == {0.0} and log_probs[1][0.0] is zero_rows[1][0.0]
  context = tiny_engine.context_tokens(prompts.few_shot_system_prompt(known[0]))
  each = [tiny_engine.score([context], HELDOUT, content_free=True,
                            steering=16.0 * pas_fit.steering_for_alpha(f, 1.0)[:1, None])
          for f in fits]
  scores = [np.asarray(e[0][0], np.float64) for e in each]
  assert np.abs(scores[0] - scores[1]).max() > 1e-4  # the fold fits really differ
  np.testing.assert_allclose(log_probs[0][16.0], np.log((np.exp(scores[0]) + np.exp(scores[1]))
                                                        / 2), atol=2e-5)
  prior = [np.exp(np.asarray(e[1][0], np.float64)) for e in each]
  np.testing.assert_allclose(priors[0][16.0], np.log((prior[0] + prior[1]) / 2), atol=2e-5)


def test_honest_path_never_reads_test_answers_end_to_end(tiny_model_dir, tmp_path):
  """Run `launch.evaluate` twice, the second time with every held-out answer changed: the
  honest path (k-fold alphas, kept heads, directions, `pas` predictions) must not move,
  while the oracle (which reads the test answers by design) shows that the change is real."""
  from launch import evaluate

  papi = data.load_papi_subjects()
  subjects = papi.select(list(papi.ids[:2]))
  outputs = {}
  for name, chosen in (("original", subjects), ("changed", with_heldout_answers_changed(
      subjects))):
    answers_file = tmp_path / f"{name}.json"
    answers_file.write_text(json.dumps([
        {"id": sid, "answers": {str(j + 1): int(a) for j, a in enumerate(row)}}
        for sid, row in zip(chosen.ids, chosen.answers, strict=True)]))
    config = tiny_run_config(tiny_model_dir, subjects=str(answers_file),
                             methods="few_shot,pas,pas_oracle_test", plots=False,
                             **{"pas.alphas": (0.0, 4.0, 16.0)})
    evaluate.run(config, str(tmp_path / name))
    outputs[name] = {(r["subject"], r["method"]): r for r in stored(tmp_path / name).records()}
  original, changed = outputs["original"], outputs["changed"]
  for sid in subjects.ids:
    a, b = original[(sid, "pas")], changed[(sid, "pas")]
    assert a["alpha"] == b["alpha"] and a["fold_error"] == b["fold_error"]
    # Every readout, and the one chosen per subject on the known items, predicts the same.
    assert set(a["decodings"]) == {"chosen", *readout.DECODINGS}
    assert a["decodings"]["chosen"]["decoding"] == b["decodings"]["chosen"]["decoding"]
    for decoding in a["decodings"]:
      assert a["decodings"][decoding]["predictions"] == b["decodings"][decoding]["predictions"]
      assert a["decodings"][decoding]["sum"] != b["decodings"][decoding]["sum"]  # scored anew
    fa, fb = original[(sid, "few_shot")], changed[(sid, "few_shot")]
    for decoding in fa["decodings"]:
      assert (fa["decodings"][decoding]["predictions"]
              == fb["decodings"][decoding]["predictions"])
    assert (original[(sid, "pas_oracle_test")]["test_error_by_alpha"]
            != changed[(sid, "pas_oracle_test")]["test_error_by_alpha"])


def test_kept_heads_and_directions_ignore_test_answers(tiny_engine, two_subjects):
  first = align(tiny_engine, two_subjects)
  second = align(tiny_engine, with_heldout_answers_changed(two_subjects))
  for a, b in zip(first, second, strict=True):
    assert a.chosen_alpha == b.chosen_alpha and a.fold_error == b.fold_error
    np.testing.assert_array_equal(a.head_mask, b.head_mask)
    np.testing.assert_array_equal(a.directions, b.directions)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    for alpha in a.test_log_probs:
      np.testing.assert_array_equal(a.test_log_probs[alpha], b.test_log_probs[alpha])
    assert a.test_error != b.test_error


def test_all_neutral_subject_gets_alpha_zero_and_no_matching(tiny_engine):
  answers = np.zeros((1, data.NUM_ITEMS), np.int8)
  answers[0, data.load_split().known] = 3
  (result,) = align(tiny_engine, data.Subjects(("neutral",), answers),
                    **{"pas.alphas": (0.0, 16.0)})
  assert not result.valid and not result.head_mask.any()
  assert set(result.chosen_alpha["kfold_known"].values()) == {0.0}
  assert np.isfinite(result.test_log_probs[0.0]).all()
  # Nothing to match a distribution to: `matched` falls back to the median, and says so.
  predicted, note = result.decoded(0.0, "matched")
  np.testing.assert_array_equal(predicted, result.predictions(0.0, "median"))
  assert "median instead" in note
  from palign_jax.protocol import records
  (record,) = records.pas_records(result, answers[0], ["few_shot"])
  assert "median instead" in record["decodings"]["matched"]["note"]
  assert "note" not in record["decodings"]["argmax"]


def test_content_free_scores_cost_one_extra_question_batch(tiny_engine):
  for n in (10, 40, 180):
    items = data.load_split().heldout[:n]
    plain = len(tiny_engine.questions(items).tokens)
    with_prior = len(tiny_engine.questions(items, content_free=True).tokens)
    assert with_prior - plain <= 1
  contexts = [tiny_engine.context_tokens(prompts.DEFAULT_SYSTEM_PROMPT)]
  items = data.load_split().heldout[:4]
  log_probs, prior = tiny_engine.score(contexts, items, content_free=True)
  np.testing.assert_allclose(log_probs, tiny_engine.score(contexts, items), atol=1e-5)
  np.testing.assert_allclose(np.exp(prior).sum(-1), 1.0, rtol=1e-6)


def test_bad_settings_are_user_errors(tiny_engine, two_subjects):
  with pytest.raises(UserInputError, match="must include 0"):
    settings_for(tiny_engine, **{"pas.alphas": (1.0, 2.0)})
  with pytest.raises(UserInputError, match="folds"):
    settings_for(tiny_engine, **{"pas.folds": 1})
  with pytest.raises(UserInputError, match="config.pas.top_k"):
    settings_for(tiny_engine, **{"pas.top_k": 1000})
  mine = data.Subjects(("me",), np.where(np.isin(np.arange(300), data.load_split().known),
                                         4, 0)[None].astype(np.int8))
  with pytest.raises(UserInputError, match="oracle_test needs held-out answers"):
    align(tiny_engine, mine, ("oracle_test",))


def test_evaluate_resumes_and_reports_agree(tiny_model_dir, tmp_path, monkeypatch):
  from launch import evaluate
  out = tmp_path / "run"
  config = tiny_run_config(tiny_model_dir)
  results = evaluate.run(config, str(out))
  records = [json.loads(line) for line in (out / store.RECORDS_FILE).read_text().splitlines()]
  expected_methods = set(config.methods.split(","))
  assert {r["method"] for r in records} == expected_methods
  assert len(records) == 2 * len(expected_methods)
  # The report is computed from the records.
  for method, headline in (("few_shot", "chosen"), ("ridge_cv", "-"), ("zero_shot", "argmax")):
    sums = [r["decodings"][headline]["sum"] for r in records if r["method"] == method]
    assert results["methods"][method]["mean"]["sum"] == pytest.approx(np.mean(sums))
  for decoding in readout.DECODINGS:  # every readout is a row of its own
    sums = [r["decodings"][decoding]["sum"] for r in records if r["method"] == "pas"]
    assert results["methods"][f"pas [{decoding}]"]["mean"]["sum"] == pytest.approx(np.mean(sums))
  assert "matched" not in next(r for r in records if r["method"] == "personality_prompt")[
      "decodings"]
  table = (out / "results.md").read_text()
  assert "pas_oracle_test" in table and "letter mass" in table
  # The letter mass is that of the model's letters: below 1 (a random model spreads its
  # probability over the whole vocabulary) and the same in the table and the records.
  mass = results["methods"]["zero_shot"]["letter_mass_mean"]
  assert 0 < mass < 1 and results["methods"]["constant_3"]["letter_mass_mean"] is None
  assert f"{mass:.3f}" in table
  assert results["run"]["compiled_programs"]["score_on_prefixes"] >= 1
  for png in ("errors_by_trait.png", "profile_first_subject.png"):
    assert (out / png).stat().st_size > 5000
  # Interrupted mid-write: drop the last record and leave half a line behind.
  lines = (out / store.RECORDS_FILE).read_bytes().splitlines(keepends=True)
  (out / store.RECORDS_FILE).write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
  calls = []
  original = methods.llm_records
  monkeypatch.setattr(methods, "llm_records",
                      lambda *a, **k: calls.append(a[2]) or original(*a, **k))
  evaluate.run(config, str(out))
  again = [json.loads(line) for line in (out / store.RECORDS_FILE).read_text().splitlines()]
  assert len(again) == len(records)  # recomputed only what was missing
  assert len(calls) <= 1 and all(len(c) == 1 for c in calls)
  with pytest.raises(UserInputError, match="another model or configuration"):
    evaluate.run(tiny_run_config(tiny_model_dir, seed=1), str(out))


def test_finished_records_survive_a_failure_in_the_sweep(tiny_model_dir, tmp_path,
                                                         monkeypatch):
  """zero_shot and P² records are stored as soon as they exist, before the PAS sweep."""
  from launch import evaluate

  def broken(*args, **kwargs):
    raise RuntimeError("killed during the sweep")

  monkeypatch.setattr(alignment, "align_subjects", broken)
  out = tmp_path / "run"
  config = tiny_run_config(tiny_model_dir, methods="zero_shot,personality_prompt,pas")
  with pytest.raises(RuntimeError, match="killed"):
    evaluate.run(config, str(out))
  kept = {(r["subject"], r["method"]) for r in stored(out).records()}
  assert kept == {(s, m) for s in data.load_papi_subjects().ids[:2]
                  for m in ("zero_shot", "personality_prompt")}


def test_missing_answers_are_counted_in_the_report(tmp_path):
  """The 300 PAPI subjects left 35 held-out answers blank; the report must say so."""
  from launch import evaluate
  config = tiny_run_config("unused", subjects="all", methods="constant_3", plots=False)
  results = evaluate.run(config, str(tmp_path / "all"))
  assert results["methods"]["constant_3"]["n_missing_answers"] == 35
  heldout = data.load_split().heldout
  assert (data.load_papi_subjects().answers[:, heldout] == 0).sum() == 35
  assert "| 35 |" in (tmp_path / "all" / "results.md").read_text()


def test_align_and_evaluate_agree(tiny_model_dir, tmp_path):
  """The same subjects and config give the same alphas and predictions in both launchers."""
  from launch import align, evaluate
  config = tiny_run_config(tiny_model_dir, methods="pas", plots=False)
  evaluate.run(config, str(tmp_path / "evaluate"))
  for decoding in ("chosen", "argmax"):
    config.pas.decoding = decoding
    aligned = align.run(config, str(tmp_path / f"align-{decoding}"))
    evaluated = stored(tmp_path / "evaluate")
    for sid in data.load_papi_subjects().ids[:2]:
      a, e = aligned.get(sid, "pas"), evaluated.get(sid, "pas")
      assert a["alpha"] == e["alpha"]
      assert a["decodings"] == e["decodings"]


def test_evaluate_cli_bad_input_is_one_line(tmp_path):
  for flags, message in ((["--methods=nope"], "unknown method"),
                         (["--subjects=nobody", "--methods=constant_3"], "unknown subject"),
                         (["--methods=constant_3", "--config.pas.top_k=0"], None)):
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--output_dir={tmp_path}"]
                          + flags, capture_output=True, text=True)
    if message is None:  # a baselines-only run does not use PAS settings
      assert proc.returncode == 0, proc.stderr
      continue
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_align_and_chat_cli(tiny_model_dir, tmp_path):
  out = tmp_path / "align"
  common = [f"--model={tiny_model_dir}", "--config.pas.top_k=4", "--config.pas.alphas=(0,8)",
            "--config.pas.folds=2"]
  proc = subprocess.run([sys.executable, "-m", "launch.align", "--subjects=examples/my_answers.csv",
                         f"--output_dir={out}"] + common, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "subject me: alpha=" in proc.stdout
  record = json.loads((out / store.RECORDS_FILE).read_text())
  # The honest profile steers with the mean of the 2 fold fits (4 heads each).
  assert record["alpha_selection"].startswith("kfold_known") and 4 <= len(record["heads"]) <= 8
  assert record["decodings"]["argmax"]["predictions"] == []  # no held-out answers to predict
  profile = out / "profiles" / "me"
  proc = subprocess.run([sys.executable, "-m", "launch.chat", f"--model={tiny_model_dir}",
                         f"--profile={profile}", "--prompt=Hello there", "--max_new_tokens=4",
                         "--inventory"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- unaligned ---" in proc.stdout and "aligned model" in proc.stdout
  assert "Extraversion" in proc.stdout
