"""The DPO baseline through the launchers on the tiny model: `evaluate --methods=dpo,...`, its
report, and `align --align_method=dpo` followed by `chat` on the saved profile."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_run_config

from palign_jax import data, store
from palign_jax.errors import UserInputError
from palign_jax.evaluation import methods

# A few steps of a rank-2 adapter: enough to train and choose, fast on the tiny model.
DPO_FLAGS = {"dpo.max_steps": 4, "dpo.eval_every": 2, "dpo.pairs_per_step": 4, "dpo.rank": 2,
             "dpo.learning_rates": (3e-2,)}


def answers_file(path, subjects: data.Subjects):
  path.write_text(json.dumps([
      {"id": sid, "answers": {str(j + 1): int(a) for j, a in enumerate(row) if a}}
      for sid, row in zip(subjects.ids, subjects.answers, strict=True)]))
  return str(path)


def papi_and_neutral() -> data.Subjects:
  """The first PAPI subject, and one who answered 3 to every known item (and 4 to every
  held-out one, so that the error can be scored): no usable preference pairs."""
  papi = data.load_papi_subjects()
  first = papi.select([papi.ids[0]])
  split = data.load_split()
  neutral = np.zeros((1, data.NUM_ITEMS), np.int8)
  neutral[0, split.known], neutral[0, split.heldout] = 3, 4
  return data.Subjects(first.ids + ("neutral",), np.concatenate([first.answers, neutral]))


def test_dpo_is_opt_in():
  from configs import default, quickstart
  for config in (default.get_config(), quickstart.get_config()):
    assert "dpo" not in config.methods.split(",")
    assert set(config.methods.split(",")) <= set(methods.ALL_METHODS)
  assert "dpo" in methods.ALL_METHODS and "dpo" in methods.MODEL_METHODS


def test_evaluate_dpo_and_a_baseline_end_to_end(tiny_model_dir, tmp_path):
  from launch import evaluate
  subjects = papi_and_neutral()
  config = tiny_run_config(tiny_model_dir, subjects=answers_file(tmp_path / "a.json", subjects),
                           methods="dpo,constant_3", plots=False, **DPO_FLAGS)
  out = tmp_path / "run"
  results = evaluate.run(config, str(out))
  stored = store.ResultStore(out, json.loads((out / store.RUN_FILE).read_text()))
  records = {(r["subject"], r["method"]): r for r in stored.records()}
  assert set(records) == {(s, m) for s in subjects.ids for m in ("dpo", "constant_3")}
  first, neutral = records[(subjects.ids[0], "dpo")], records[("neutral", "dpo")]
  assert first["trained"] and first["num_pairs"] > 0 and "note" not in first
  assert first["chosen_steps"] in (0, 2, 4) and first["candidate_steps"] == [0, 2, 4]
  assert not neutral["trained"] and "no usable preference pairs" in neutral["note"]
  # The headline row is the readout chosen with the steps; every readout is a row of its own.
  rows = results["methods"]
  assert "dpo" in rows and "constant_3" in rows
  for decoding in config.readout.decodings.split(","):
    assert f"dpo [{decoding}]" in rows
  chosen = [records[(s, "dpo")]["decodings"]["chosen"]["sum"] for s in subjects.ids]
  assert rows["dpo"]["mean"]["sum"] == pytest.approx(np.mean(chosen))
  assert rows["dpo"]["subject_notes"] == [f"subject neutral: {neutral['note']}"]
  table = (out / "results.md").read_text()
  dpo_row = next(line for line in table.splitlines() if line.startswith("| dpo |"))
  assert methods.METHOD_NOTES["dpo"] in dpo_row
  assert "subject neutral: skipped: no usable preference pairs" in dpo_row
  assert "| constant_3 |" in table
  # The DPO settings are part of what makes records comparable: a rerun with others is refused.
  with pytest.raises(UserInputError, match="another model or configuration"):
    evaluate.run(tiny_run_config(tiny_model_dir, subjects=config.subjects,
                                 methods="dpo,constant_3", plots=False,
                                 **{**DPO_FLAGS, "dpo.max_steps": 6}), str(out))


def run_cli(module, *flags):
  proc = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True)
  return proc


def test_align_dpo_then_chat_cli(tiny_model_dir, tmp_path):
  out = tmp_path / "align"
  model = f"--model={tiny_model_dir}"
  dpo_flags = [f"--config.{k}={v if not isinstance(v, tuple) else repr(v)}"
               for k, v in DPO_FLAGS.items()] + ["--config.pas.folds=2"]
  proc = run_cli("launch.align", "--subjects=examples/my_answers.csv", "--align_method=dpo",
                 f"--output_dir={out}", model, *dpo_flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "subject me: dpo steps=" in proc.stdout and "preference pairs" in proc.stdout
  record = json.loads((out / store.RECORDS_FILE).read_text())
  assert record["method"] == "dpo" and record["decodings"]["argmax"]["predictions"] == []
  profile = out / "profiles" / "me"
  proc = run_cli("launch.chat", model, f"--profile={profile}", "--prompt=Hello there",
                 "--max_new_tokens=4", "--inventory")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Profile of subject me (dpo)" in proc.stdout and "DPO steps" in proc.stdout
  assert "--- unaligned ---" in proc.stdout and "--- aligned to me ---" in proc.stdout
  assert "aligned model" in proc.stdout and "Extraversion" in proc.stdout
  proc = run_cli("launch.chat", model, f"--profile={profile}", "--prompt=Hi", "--alpha=2")
  assert proc.returncode == 2 and "has no steering" in proc.stderr
  assert "Traceback" not in proc.stderr
  # A PAS run into the DPO directory is refused rather than mixed.
  proc = run_cli("launch.align", "--subjects=examples/my_answers.csv", f"--output_dir={out}",
                 model, "--config.pas.folds=2", "--config.pas.top_k=4")
  assert proc.returncode == 2 and "another model or configuration" in proc.stderr


def test_chat_uses_the_profile_adapter(tiny_engine):
  """Chat's aligned reply and inventory run under the profile's adapter: with a strong random
  adapter both differ from the unaligned model; without one they are the unaligned model."""
  import jax
  from absl import flags

  from launch import chat
  from palign_jax import prompts
  from palign_jax.dpo import lora
  from palign_jax.protocol import profile as profile_lib

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # chat's flags at their defaults
  config = tiny_engine.config
  adapters = lora.to_numpy(lora.init_adapters(jax.random.PRNGKey(0), config, rank=2,
                                              targets=("q_proj", "v_proj")))
  rng = np.random.default_rng(0)
  for factors in adapters.values():
    factors["b"] = rng.normal(0, 2.0, factors["b"].shape).astype(np.float32)
  make = lambda adapters: profile_lib.AlignmentProfile(
      subject_id="me", model_fingerprint=tiny_engine.fingerprint, model_source="tiny",
      prompt_version=prompts.PROMPT_VERSION, system_prompt=prompts.DEFAULT_SYSTEM_PROMPT,
      alpha=0.0, alpha_selection="kfold_known", known_answers=np.full(120, 4),
      head_mask=None, directions=None, sigma=None, method="dpo", adapters=adapters,
      settings={"steps": 4, "num_pairs": 96, "decoding": "argmax"})
  person = np.zeros(data.NUM_ITEMS, np.int64)
  rows = lambda table: table.splitlines()[2:]  # unaligned, aligned
  plain = chat.inventory_table(tiny_engine, make(None), person)
  assert rows(plain)[0].split()[2:] == rows(plain)[1].split()[2:]
  adapted = chat.inventory_table(tiny_engine, make(adapters), person)
  assert rows(adapted)[0] == rows(plain)[0] and rows(adapted)[1] != rows(plain)[1]
  from palign_jax import api
  unaligned = api.generate(tiny_engine, [None], ["Hello"], **chat.options())[0][0]
  assert chat.answer(tiny_engine, make(None), "Hello", None) == unaligned
  assert chat.answer(tiny_engine, make(adapters), "Hello", None) != unaligned
