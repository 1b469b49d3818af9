"""launch.answer: the questionnaire parser's refusals, many profiles scored as one batch (PAS and
DPO mixed) against each alone and against the engine's own PAPI scoring, resume, the CLI."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from palign_jax import administer, prompts, store
from palign_jax import questionnaire as questionnaire_lib
from palign_jax.errors import UserInputError
from palign_jax.protocol import profile as profile_lib
from tests.conftest import tiny_run_config

EXAMPLE = pathlib.Path("examples/weekend_habits.csv")
GOOD = "item,statement,trait,keyed\nq1,Talk a lot.,E,+\nq2,Keep quiet.,E,-\n"
SCALE = "# option: A, 1, yes\n# option: B, 0, no\n"


def write(tmp_path, text, name="q.csv"):
  path = tmp_path / name
  path.write_text(text)
  return path


@pytest.mark.parametrize("text, message", [
    ("item,text\nq1,Talk a lot.\n", r"q.csv: line 1 \(header\): missing column 'statement'"),
    ("item,statement\nq1,Talk a lot.\nq2,  \n", r"q.csv: line 3, field 'statement': empty"),
    ("item,statement\nq1,Talk a lot.\nq1,Keep quiet.\n",
     r"q.csv: line 3, field 'item': duplicate item 'q1' \(first on line 2\)"),
    ("# option: A, 1, yes\nitem,statement\nq1,Talk a lot.\n",
     r"q.csv: line 1: a scale needs at least 2 options, got 1"),
    ("item,statement,keyed\nq1,Talk a lot.,x\n", r"q.csv: line 2, field 'keyed': 'x'"),
    (SCALE + "# option: C, 0, maybe\n" + GOOD, r"q.csv: line 3, field 'value': 0.0 is already"),
    ("item,statement\n", r"q.csv: line 1: no items after the header"),
])
def test_bad_questionnaires_are_refused_by_file_and_line(tmp_path, text, message):
  with pytest.raises(UserInputError, match=message):
    questionnaire_lib.load(write(tmp_path, text))


def test_scale_keys_must_be_one_distinct_token(tmp_path, tiny_engine):
  tokenizer = tiny_engine.model.tokenizer
  bad = questionnaire_lib.load(write(tmp_path, "# option: Yes, 1, yes\n# option: Agree, 0, "
                                     "no\n" + GOOD))
  with pytest.raises(UserInputError, match=r"q.csv: line 2, field 'key': option key 'Agree' "
                     "tokenises ambiguously"):
    questionnaire_lib.check_scale(tokenizer, bad.scale)
  scale_file = write(tmp_path, "key,value,label\n1,1,low\n10,2,high\n", "scale.csv")
  with pytest.raises(UserInputError, match=r"scale.csv: line 3, field 'key': option key '10'"):
    questionnaire_lib.check_scale(tokenizer, questionnaire_lib.load_scale(scale_file))


def test_example_questionnaire_parses_with_its_own_scale():
  q = questionnaire_lib.load(EXAMPLE)
  assert q.scale.keys == ("A", "B", "C", "D") and q.scale.values.tolist() == [4, 3, 2, 1]
  assert len(q.items) == 10 and set(q.traits) == {"Sociability", "Orderliness"}
  assert q.keyed.tolist() == [1, -1, 1, -1, 1, 1, -1, 1, -1, 1]
  assert questionnaire_lib.ipip_indices(q) is None


def test_papi_scale_gives_papi_questions():
  text = "Worry about things."
  assert (questionnaire_lib.question_text(text, questionnaire_lib.papi_scale())
          == prompts.question(text))


def test_readouts_and_trait_scores_by_hand():
  values = np.array([4.0, 3.0, 2.0, 1.0])
  log_probs = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.1, 0.2]]))
  assert questionnaire_lib.read(log_probs, values, "argmax").tolist() == [1, 4]
  assert questionnaire_lib.read(log_probs, values, "median").tolist() == [2, 4]
  np.testing.assert_allclose(questionnaire_lib.read(log_probs, values, "expected"),
                             [2.0, 3.1])
  q = questionnaire_lib.load(EXAMPLE)
  answers = np.arange(10, dtype=float) % 4 + 1  # 1 2 3 4 1 | 2 3 4 1 2
  names, scores = questionnaire_lib.trait_scores(answers, q)
  assert names == ("Sociability", "Orderliness")  # reverse-keyed v -> 5 - v
  np.testing.assert_allclose(scores, [np.mean([1, 3, 3, 1, 1]), np.mean([2, 2, 4, 4, 2])])


def pas_profile(engine, seed, alpha=3.0, fingerprint=None):
  c = engine.config
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(c.num_layers, c.num_heads, c.head_dim)).astype(np.float32)
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  known = rng.integers(1, 6, 120)
  return profile_lib.AlignmentProfile(
      subject_id=f"pas{seed}", model_fingerprint=fingerprint or engine.fingerprint,
      model_source="tiny", prompt_version=prompts.PROMPT_VERSION,
      system_prompt=prompts.few_shot_system_prompt(known), alpha=alpha,
      alpha_selection="kfold_known", known_answers=known,
      head_mask=rng.random((c.num_layers, c.num_heads)) < 0.5, directions=directions,
      sigma=rng.uniform(0.5, 2, (c.num_layers, c.num_heads)).astype(np.float32))


def dpo_profile(engine, seed, rank, targets=("q_proj", "v_proj")):
  from palign_jax.models.llama import adapter_dims
  rng = np.random.default_rng(seed)
  c = engine.config
  adapters = {}
  for t in targets:
    d_in, d_out = adapter_dims(c, t)
    adapters[t] = {"a": rng.normal(0, 0.3, (c.num_layers, d_in, rank)).astype(np.float32),
                   "b": rng.normal(0, 1.0, (c.num_layers, rank, d_out)).astype(np.float32)}
  return profile_lib.AlignmentProfile(
      subject_id=f"dpo{seed}", model_fingerprint=engine.fingerprint, model_source="tiny",
      prompt_version=prompts.PROMPT_VERSION, system_prompt=prompts.DEFAULT_SYSTEM_PROMPT,
      alpha=0.0, alpha_selection="kfold_known", known_answers=rng.integers(1, 6, 120),
      head_mask=None, directions=None, sigma=None, method="dpo", adapters=adapters)


def mixed_profiles(engine):
  return [pas_profile(engine, 1), dpo_profile(engine, 2, rank=2),
          pas_profile(engine, 3, alpha=0.0), dpo_profile(engine, 4, rank=3,
                                                          targets=("k_proj", "v_proj"))]


def test_a_mixed_batch_equals_each_profile_alone(tiny_engine):
  """PAS rows get zero adapters and DPO rows zero steering in one batch; each row must equal
  that profile scored alone (no side path it lacks), and the profiles must really differ."""
  profiles = mixed_profiles(tiny_engine)
  prepared = administer.prepare(tiny_engine.model.tokenizer, questionnaire_lib.load(EXAMPLE))
  together = administer.score(tiny_engine, profiles, prepared, prefix_batch=4)
  alone = np.concatenate([administer.score(tiny_engine, [p], prepared, prefix_batch=1)
                          for p in profiles])
  assert together.shape == (4, 10, 4)
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
  assert np.abs(together[1] - together[3]).max() > 1e-2  # different adapters, same context
  assert np.abs(together[0] - together[2]).max() > 1e-2


def test_ipip_questionnaire_matches_the_engines_papi_scoring(tiny_engine):
  """The IPIP items with PAPI's scale through `administer` are the engine's own PAPI questions:
  same log-probabilities, steered and adapted, computed by an independent path."""
  items = np.arange(0, 300, 37)
  prepared = administer.prepare(tiny_engine.model.tokenizer, questionnaire_lib.from_ipip(items))
  pas, dpo = pas_profile(tiny_engine, 5), dpo_profile(tiny_engine, 6, rank=2)
  ours = administer.score(tiny_engine, [pas, dpo], prepared, prefix_batch=2)
  import jax.numpy as jnp
  steered = tiny_engine.score([tiny_engine.context_tokens(pas.system_prompt)], items,
                              steering=jnp.asarray(pas.steering())[None, None])
  adapted = tiny_engine.score([tiny_engine.context_tokens(dpo.system_prompt)], items,
                              adapters={t: {k: v[None] for k, v in f.items()}
                                        for t, f in dpo.adapters.items()})
  np.testing.assert_allclose(ours, np.concatenate([steered, adapted]), rtol=1e-5, atol=1e-5)


def answer_config(model_dir, questionnaire, profiles, **overrides):
  config = tiny_run_config(model_dir, **overrides)
  config.answer.questionnaire = str(questionnaire)
  config.answer.profiles = str(profiles)
  config.answer.profiles_per_batch = 1
  return config


def save_all(folder, profiles):
  for p in profiles:
    profile_lib.save_profile(folder / p.subject_id, p)
  return folder


def test_run_resumes_and_refuses_other_models(tiny_model_dir, tiny_engine, tmp_path,
                                              monkeypatch):
  from absl import flags

  from launch import answer
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  folder = save_all(tmp_path / "profiles", mixed_profiles(tiny_engine)[:3])
  config = answer_config(tiny_model_dir, EXAMPLE, folder)
  scored, real = [], administer.score

  def dies_after_two(engine, profiles, prepared, **kw):
    if len(scored) == 2:
      raise KeyboardInterrupt  # killed mid-run
    scored.extend(p.subject_id for p in profiles)
    return real(engine, profiles, prepared, **kw)

  monkeypatch.setattr(administer, "score", dies_after_two)
  with pytest.raises(KeyboardInterrupt):
    answer.run(config, str(tmp_path / "out"), engine=tiny_engine)
  records = (tmp_path / "out" / store.RECORDS_FILE).read_text().splitlines()
  assert [json.loads(r)["subject"] for r in records] == ["dpo2", "pas1"]
  monkeypatch.setattr(administer, "score", real)
  scored.clear()
  monkeypatch.setattr(administer, "score", lambda e, ps, pr, **kw: (
      scored.extend(p.subject_id for p in ps), real(e, ps, pr, **kw))[1])
  result = answer.run(config, str(tmp_path / "out"), engine=tiny_engine)
  assert scored == ["pas3"]  # the finished pairs are not scored again
  fresh = administer.score(tiny_engine, result["profiles"], administer.prepare(
      tiny_engine.model.tokenizer, questionnaire_lib.load(EXAMPLE)), prefix_batch=3)
  np.testing.assert_allclose(result["log_probs"], fresh, rtol=1e-5, atol=1e-5)
  rows = (tmp_path / "out" / "answers.csv").read_text().splitlines()
  assert len(rows) == 1 + 3 * 10 and rows[0].startswith("profile,profile_method,item,trait")
  assert len((tmp_path / "out" / "trait_scores.csv").read_text().splitlines()) == 1 + 3 * 2
  assert (tmp_path / "out" / "trait_scores.png").stat().st_size > 1000

  other = save_all(tmp_path / "other", [pas_profile(tiny_engine, 7, fingerprint="0ther")])
  with pytest.raises(UserInputError, match=r"other/pas7: this profile was made for model"):
    answer.run(answer_config(tiny_model_dir, EXAMPLE, f"{folder},{other / 'pas7'}"),
               str(tmp_path / "refused"), engine=tiny_engine)
  bad = write(tmp_path, "item,statement\nq1,\n")
  with pytest.raises(UserInputError, match="line 2, field 'statement'"):
    answer.run(answer_config(tiny_model_dir, bad, folder), str(tmp_path / "refused"),
               engine=tiny_engine)
  assert not (tmp_path / "refused").exists()  # nothing written for a refused input


def test_cli_answers_and_refuses_in_one_line(tiny_model_dir, tiny_engine, tmp_path):
  folder = save_all(tmp_path / "profiles", mixed_profiles(tiny_engine)[:2])
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "launch.answer", f"--model={tiny_model_dir}",
         f"--questionnaire={EXAMPLE}", f"--profiles={folder}", f"--output_dir={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| Sociability |" in proc.stdout and "2 profiles x 10 items" in proc.stdout
  lines = (out / "answers.jsonl").read_text().splitlines()
  first = json.loads(lines[0])
  assert len(lines) == 20 and set(first["probabilities"]) == {"A", "B", "C", "D"}
  assert set(first["answers"]) == {"argmax", "median", "expected"}
  bad = write(tmp_path, "item,statement\nq1,Talk.\nq1,Talk.\n")
  proc = subprocess.run(cmd[:3] + [f"--questionnaire={bad}", f"--profiles={folder}",
                                   f"--output_dir={tmp_path / 'no'}"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().count("\n") == 0 and "duplicate item 'q1'" in proc.stderr
  assert not (tmp_path / "no").exists()


def test_profile_specs_folder_run_glob_and_list(tiny_engine, tmp_path):
  folder = save_all(tmp_path / "run" / "profiles", mixed_profiles(tiny_engine)[:2])
  expected = [folder / "dpo2", folder / "pas1"]
  for spec in (folder, tmp_path / "run", f"{tmp_path}/run/profiles/*",
               f"{folder / 'dpo2'},{folder / 'pas1'}"):
    assert profile_lib.profile_paths(str(spec)) == expected
  with pytest.raises(UserInputError, match="no such profile"):
    profile_lib.profile_paths(str(tmp_path / "missing"))
  with pytest.raises(UserInputError, match="names no alignment profile"):
    profile_lib.profile_paths(f"{tmp_path}/nothing*")
  twin = dataclasses.replace(dpo_profile(tiny_engine, 5, rank=2), subject_id="pas1")
  save_all(tmp_path / "twin", [twin])
  labels, _ = profile_lib.load_profiles(f"{folder},{tmp_path / 'twin'}")
  assert labels == ["dpo2", "pas1:pas", "pas1:dpo"]  # the same person, PAS and DPO
  save_all(tmp_path / "again", [mixed_profiles(tiny_engine)[0]])
  with pytest.raises(UserInputError, match="are both 'pas1:pas'"):
    profile_lib.load_profiles(f"{folder},{tmp_path / 'again'}")


def test_ipip_questionnaire_plots_against_own_answers(tiny_model_dir, tiny_engine, tmp_path):
  from launch import answer
  from palign_jax import data
  from palign_jax.evaluation import plots
  items = data.load_items()
  picks = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  rows = "".join(f"{items.number[j]},{items.text[j]},{data.TRAITS[items.trait[j]]},"
                 f"{'+' if items.keyed[j] > 0 else '-'}\n" for j in picks)
  questionnaire = write(tmp_path, "item,statement,trait,keyed\n" + rows, "ipip.csv")
  profiles = mixed_profiles(tiny_engine)[:2]
  folder = save_all(tmp_path / "profiles", profiles)
  result = answer.run(answer_config(tiny_model_dir, questionnaire, folder),
                      str(tmp_path / "out"), engine=tiny_engine)
  by_label = dict(zip(result["labels"], result["profiles"], strict=True))
  table = (tmp_path / "out" / "trait_scores.csv").read_text().splitlines()[1:]
  for line in table:
    label, trait, *_, own = line.split(",")
    person = plots.trait_scores(by_label[label].known_answers, data.load_split().known)
    assert float(own) == pytest.approx(person[data.TRAITS.index(trait)], abs=1e-4)
  assert "own answers, mean" in (tmp_path / "out" / "summary.md").read_text()
