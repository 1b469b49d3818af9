"""palign_jax.api: align, save/load, answer and generate for many profiles at once, each
batched call against the same work one profile at a time; generation controls; the README
example (slow, on the embedded model)."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from palign_jax import api, prompts, scoring
from tests.conftest import tiny_run_config
from tests.test_answer import EXAMPLE, dpo_profile, pas_profile

NO_SAMPLING = dict(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
  return api.load_model(str(tiny_model_dir), config=tiny_run_config(tiny_model_dir))


def test_align_save_load_answer(model, tmp_path):
  people = api.align(model, {"me": {i: 1 + i % 5 for i in range(1, 301)}})
  assert [p.subject_id for p in people] == ["me"] and people[0].method == "pas"
  api.save(people, tmp_path / "profiles")
  loaded = api.load(model, tmp_path / "profiles")
  assert loaded[0].system_prompt == people[0].system_prompt
  both = loaded + [dpo_profile(model, 2, rank=2)]
  answers = api.answer(model, both, EXAMPLE)
  assert answers.log_probs.shape == (2, 10, 4)
  alone = api.answer(model, both[1:], EXAMPLE)
  np.testing.assert_allclose(answers.log_probs[1], alone.log_probs[0], rtol=1e-5, atol=1e-5)
  scores = answers.trait_scores("argmax")
  assert set(scores) == {"Sociability", "Orderliness"} and scores["Sociability"].shape == (2,)
  ipip = api.answer(model, both[:1], np.arange(5))  # IPIP indices: the engine's questions
  engine_scores = model.score([model.context_tokens(loaded[0].system_prompt)], np.arange(5),
                              steering=jnp.asarray(loaded[0].steering())[None, None])
  np.testing.assert_allclose(ipip.log_probs, engine_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    NO_SAMPLING, dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3,
                      no_repeat_ngram_size=3, seed=5)])
def test_generate_batched_equals_one_at_a_time(model, options):
  """Rows of PAS steering, a DPO adapter and the unaligned model, two prompts each, in one
  generation; each row must be what that (profile, prompt) gives alone (greedy, and sampled
  with per-row keys)."""
  profiles = [pas_profile(model, 1, alpha=8.0), dpo_profile(model, 2, rank=2), None]
  questions = ["How was your weekend?", "Describe yourself."]
  together = api.generate(model, profiles, questions, max_new_tokens=8, **options)
  alone = [[api.generate(model, [p], [q], max_new_tokens=8, **options)[0][0]
            for q in questions] for p in profiles]
  assert together == alone
  assert together[0] != together[2] or together[1] != together[2]  # the profiles act


def test_no_repeat_ngram_and_repetition_penalty(model):
  tokens = [prompts.encode_chat_prompt(model.model.tokenizer, prompts.DEFAULT_SYSTEM_PROMPT, q)
            for q in ("Hello", "Tell me a story.")]
  steering = pas_profile(model, 1, alpha=20.0).steering()  # hard steering: the model loops
  run = lambda **kw: scoring.generate(model.model.params, model.config, tokens, 40,
                                      steering=steering, **kw)
  plain = run()

  def repeats(row, n):
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) - len(set(grams))

  assert all(repeats(list(r), 3) > 10 for r in plain)
  for row in run(no_repeat_ngram_size=3):
    assert repeats(list(row), 3) == 0
  for row in run(repetition_penalty=1e9):  # every seen token's logit goes to <= 0
    assert len(set(row.tolist())) == len(row)
  with pytest.raises(Exception, match="no_repeat_ngram_size"):
    run(no_repeat_ngram_size=1)
  with pytest.raises(Exception, match="top_p"):
    run(temperature=1.0, top_p=0.0)


def loops(text: str) -> bool:
  """A reply that repeats itself: a sentence said twice, or a word 3-gram said 3 times."""
  sentences = [s.strip().lower() for s in text.replace("!", ".").replace("?", ".").split(".")]
  sentences = [s for s in sentences if len(s.split()) >= 3]
  words = text.lower().split()
  grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
  return (len(sentences) != len(set(sentences))
          or any(grams.count(g) >= 3 for g in set(grams)))


def test_loop_detector_flags_the_reported_reply():
  reported = "I'm sorry for any confusion. " + "I'm sorry for any misunderstanding. " * 6
  assert loops(reported) and not loops("I had a quiet weekend. We walked by the river.")


def test_chat_profiles_side_by_side_cli(tiny_model_dir, model, tmp_path):
  folder = tmp_path / "profiles"
  api.save([pas_profile(model, 1), dpo_profile(model, 2, rank=2)], folder)
  out = tmp_path / "replies.csv"
  proc = subprocess.run([sys.executable, "-m", "launch.chat", f"--model={tiny_model_dir}",
                         f"--profiles={folder}", "--prompt=Hello there", "--max_new_tokens=4",
                         f"--output_file={out}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- unaligned ---" in proc.stdout and "--- pas1 ---" in proc.stdout
  assert "pas1 (pas): context: a system prompt of 120 questionnaire answers" in proc.stdout
  assert "steering at alpha 3" in proc.stdout and "dpo2 (dpo): context: the default" in proc.stdout
  assert out.read_text().splitlines()[0] == "prompt,unaligned,dpo2,pas1"


@pytest.mark.slow
def test_default_generation_does_not_loop_on_the_embedded_model():
  """The issue's case: the few-shot context of examples/my_answers.csv (the profile chose
  alpha 0) and a few everyday prompts; the default settings must not loop."""
  from palign_jax import data
  model = api.load_model("default")
  person = data.load_subjects_file("examples/my_answers.csv")
  profile = pas_profile(model, 0, alpha=0.0)
  profile.system_prompt = prompts.few_shot_system_prompt(data.known_answers(person)[0])
  questions = ["How was your weekend?", "What do you do to relax?",
               "Tell me about your best friend."]
  replies = api.generate(model, [profile, None], questions)
  for reply in sum(replies, []):
    assert reply and not loops(reply), reply


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path):
  root = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run([sys.executable, str(root / "examples" / "api_example.py")],
                        capture_output=True, text=True, cwd=root,
                        env={**os.environ, "PYTHONPATH": str(root)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Sociability" in proc.stdout and "unaligned: " in proc.stdout
