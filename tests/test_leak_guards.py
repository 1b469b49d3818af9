"""Leak guards that are themselves tested.

`leak_guard` runs the honest path (PAS with `pas_probes`, or DPO) twice on the tiny model, the
second time with every held-out answer changed, and fails if any choice or prediction moved.
Each test below first injects a leak on purpose (a step that reads the held-out answers) and
asserts that the guard turns red, so a later change that blinds the guard fails CI too; the
clean path must pass it.
"""

import dataclasses

import numpy as np
import pytest
from conftest import tiny_run_config

from palign_jax import data, readout
from palign_jax.protocol import alignment, dpo, records
from palign_jax.protocol import selection as selection_lib

HELDOUT = data.load_split().heldout[::6]
ALPHAS = (0.0, 4.0, 16.0)
LEAK: dict = {}  # what an injected leak reads: the running subjects' held-out answers


class LeakDetected(AssertionError):
  pass


def changed(subjects: data.Subjects) -> data.Subjects:
  answers = subjects.answers.copy()
  heldout = data.load_split().heldout
  answers[:, heldout] = np.where(answers[:, heldout] > 0, answers[:, heldout] % 5 + 1, 4)
  return data.Subjects(subjects.ids, answers)


def _jsonable(value):
  return records._floats(value) if isinstance(value, np.ndarray) else value


def pas_outcome(engine, subjects) -> dict:
  """Everything the honest PAS path decides and predicts, for comparison."""
  LEAK["answers"] = subjects.answers[:, HELDOUT]
  c = engine.config
  settings = dataclasses.replace(alignment.AlignSettings.from_config(
      tiny_run_config("unused"), c.num_layers * c.num_heads), alphas=ALPHAS)
  results = alignment.align_subjects(
      engine, engine.activations(), subjects, settings, heldout=HELDOUT,
      heldout_activations=engine.activations("heldout")[::6])
  out = {}
  for result, answers in zip(results, subjects.answers, strict=True):
    recs = records.pas_records(result, answers, ["few_shot", "pas", "pas_probes"])
    out[result.subject_id] = {
        "alpha": result.chosen_alpha, "decoding": result.chosen_decoding,
        "selection": result.selection,
        "predictions": {r["method"]: {d: e["predictions"] for d, e in r["decodings"].items()}
                        for r in recs}}
  return out


def dpo_outcome(engine, subjects) -> dict:
  LEAK["answers"] = subjects.answers[:, HELDOUT]
  settings = dpo.DpoSettings.from_config(tiny_run_config("unused", **{
      "dpo.max_steps": 2, "dpo.eval_every": 1, "dpo.pairs_per_step": 4, "dpo.rank": 2,
      "dpo.learning_rates": (3e-2,)}))
  results = dpo.align_subjects(engine, subjects, settings, heldout=HELDOUT)
  return {r.subject_id: {"steps": r.chosen_steps, "decoding": r.chosen_decoding,
                         "selection": r.selection,
                         "predictions": {d: r.predictions(d).tolist() for d in r.decodings}}
          for r in results}


def leak_guard(outcome, engine, subjects) -> None:
  """Raises `LeakDetected` naming what moved when the held-out answers changed."""
  first, second = outcome(engine, subjects), outcome(engine, changed(subjects))
  for sid in first:
    for key in first[sid]:
      a = {k: _jsonable(v) for k, v in first[sid][key].items()} if isinstance(
          first[sid][key], dict) else first[sid][key]
      b = {k: _jsonable(v) for k, v in second[sid][key].items()} if isinstance(
          second[sid][key], dict) else second[sid][key]
      if a != b:
        raise LeakDetected(f"subject {sid}: {key} changed with the held-out answers")


@pytest.fixture(scope="module")
def subjects():
  papi = data.load_papi_subjects()
  return papi.select(["172481", papi.ids[1]])


def _digest(answers: np.ndarray, k: int) -> int:
  """A leak's decision from held-out answers: any function of them will do."""
  return int(np.frombuffer(np.asarray(answers, np.int64).tobytes(), np.uint8).sum()) % k


def test_the_clean_pas_path_passes(tiny_engine, subjects):
  leak_guard(pas_outcome, tiny_engine, subjects)


def test_guard_catches_alpha_chosen_from_test_answers(tiny_engine, subjects, monkeypatch):
  original = selection_lib.choose_candidate

  def leaky(error, standard_error, inadmissible, se_rule):  # the alpha picked by the test set
    chosen, best, bar = original(error, standard_error, inadmissible, se_rule)
    return _digest(LEAK["answers"], len(error)), best, bar

  monkeypatch.setattr(selection_lib, "choose_candidate", leaky)
  with pytest.raises(LeakDetected):
    leak_guard(pas_outcome, tiny_engine, subjects)


def test_guard_catches_readout_chosen_by_the_test_error(tiny_engine, subjects, monkeypatch):
  original = alignment.align_subjects

  def leaky(*args, **kwargs):
    results = original(*args, **kwargs)
    for r in results:
      r.chosen_decoding["pas"] = min(r.decodings, key=lambda d: r.test_error[d][0.0])
    return results

  monkeypatch.setattr(alignment, "align_subjects", leaky)
  with pytest.raises(LeakDetected):
    leak_guard(pas_outcome, tiny_engine, subjects)


def test_guard_catches_a_matched_map_fitted_on_test_answers(tiny_engine, subjects,
                                                            monkeypatch):
  original = readout.decode

  def leaky(log_probs, decoding, *, prior=None, match=None):
    if decoding == "matched" and match is not None:
      test = LEAK["answers"][0]
      match = (match[0], np.resize(test, len(match[1])))
    return original(log_probs, decoding, prior=prior, match=match)

  monkeypatch.setattr(readout, "decode", leaky)
  with pytest.raises(LeakDetected):
    leak_guard(pas_outcome, tiny_engine, subjects)


def test_guard_catches_admissibility_that_reads_test_answers(tiny_engine, subjects,
                                                             monkeypatch):
  original = selection_lib.admissible

  def leaky(mass_mean, mass_low, settings, usable=None):
    why = original(mass_mean, mass_low, settings, usable)
    if _digest(LEAK["answers"], 2):
      why.update({c: "leak" for c in range(1, len(mass_mean))})
    else:
      why.clear()
    return why

  monkeypatch.setattr(selection_lib, "admissible", leaky)
  # The tiny model's choices must depend on admissibility for this to show: a plain argmin.
  monkeypatch.setattr(selection_lib, "choose_candidate",
                      lambda e, s, w, r, _orig=selection_lib.choose_candidate: _orig(e, s, w, 0.0))
  with pytest.raises(LeakDetected):
    leak_guard(pas_outcome, tiny_engine, subjects)


def test_guard_catches_pas_probes_mapped_with_test_answers(tiny_engine, subjects, monkeypatch):
  original = alignment.probe_readout

  def leaky(known_scores, known, test_scores):
    return original(known_scores, np.resize(LEAK["answers"][0], len(known)), test_scores)

  monkeypatch.setattr(alignment, "probe_readout", leaky)
  with pytest.raises(LeakDetected):
    leak_guard(pas_outcome, tiny_engine, subjects)


def test_the_clean_dpo_path_passes_and_a_step_leak_is_caught(tiny_engine, subjects,
                                                            monkeypatch):
  leak_guard(dpo_outcome, tiny_engine, subjects)
  original = selection_lib.choose_candidate

  def leaky(error, standard_error, inadmissible, se_rule):
    chosen, best, bar = original(error, standard_error, inadmissible, se_rule)
    return _digest(LEAK["answers"], len(error)), best, bar

  monkeypatch.setattr(selection_lib, "choose_candidate", leaky)
  with pytest.raises(LeakDetected):
    leak_guard(dpo_outcome, tiny_engine, subjects)
