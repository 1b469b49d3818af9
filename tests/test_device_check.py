"""The device check for a bare accelerator machine (`benchmarks/device_check.py`).

End to end on the CPU with the tiny preset through `scripts/device_check.sh`, its stage
guards, the completeness of its carried-wheel list (its imports succeed with every installed
distribution hidden except the bare machine's packages, their dependencies and the carried
wheels), and the shipped SmolLM2 tokenizer against the GGUF-derived one on every PAPI prompt.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from palign_jax import data, prompts, readout
from palign_jax.errors import UserInputError
from palign_jax.models import shipped_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_check  # noqa: E402  (benchmarks/, stdlib-only at import)

PROJECT_MODULES = {"palign_jax", "configs", "common", "device_check", "__main__"}
TOOLING = {"pip", "setuptools"}  # in every environment pip can install into


@pytest.fixture(scope="module")
def gguf_tokenizer():
  from palign_jax.models import gguf as gguf_lib
  from palign_jax.models.tokenizer import tokenizer_from_gguf
  try:
    return tokenizer_from_gguf(gguf_lib.default_gguf_path())
  except UserInputError as err:
    pytest.skip(f"needs the installed SmolLM2 GGUF: {err}")


def test_shipped_tokenizer_encodes_papi_prompts_like_the_gguf(gguf_tokenizer):
  ours, theirs = shipped_tokenizer.load_shipped_tokenizer(), gguf_tokenizer
  system = prompts.DEFAULT_SYSTEM_PROMPT
  for text in data.load_items().text:
    assert prompts.encode_question(ours, system, text) == \
        prompts.encode_question(theirs, system, text), text
    for letter in ("A", "E"):
      assert prompts.encode_activation_prompt(ours, text, letter) == \
          prompts.encode_activation_prompt(theirs, text, letter), text
  subjects = data.load_papi_subjects()
  for answers in data.known_answers(subjects)[::25]:
    few_shot = prompts.few_shot_system_prompt(answers)
    assert prompts.encode_system(ours, few_shot) == prompts.encode_system(theirs, few_shot)
  descriptions = data.load_descriptions()
  for subject_id in list(subjects.ids)[:12]:
    system = prompts.description_system_prompt(descriptions[subject_id])
    assert prompts.encode_system(ours, system) == prompts.encode_system(theirs, system)
  for statement in readout.CONTENT_FREE_STATEMENTS:
    assert prompts.encode_question(ours, system, statement) == \
        prompts.encode_question(theirs, system, statement)
  chat = ("Tell me about yourself, 12345 times! 😀", "Ünïcödé\ttabs\n\nand  spaces")
  for user in chat:
    ids = prompts.encode_chat_prompt(ours, system, user)
    assert ids == prompts.encode_chat_prompt(theirs, system, user)
    assert ours.decode(ids, skip_special_tokens=True) == \
        theirs.decode(ids, skip_special_tokens=True)
  np.testing.assert_array_equal(prompts.option_token_ids(ours), prompts.option_token_ids(theirs))
  for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "chat_template"):
    assert getattr(ours, name) == getattr(theirs, name), name


def test_shipped_tokenizer_asset_is_what_the_gguf_gives_today(gguf_tokenizer):
  with gzip.open(shipped_tokenizer.SHIPPED_TOKENIZER, "rt", encoding="utf-8") as f:
    shipped = json.load(f)
  assert shipped == json.loads(json.dumps(shipped_tokenizer.tokenizer_spec(gguf_tokenizer)))
  assert "Apache" in shipped["about"]


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str]:
  """The bare machine's packages and what they require (markers evaluated here, no extras),
  the carried wheels and the packaging tools, as canonical names."""
  import importlib.metadata

  from packaging.requirements import Requirement

  todo = list(device_check.BARE_PACKAGES)
  allowed = set()
  while todo:
    name = _canonical(todo.pop())
    if name in allowed:
      continue
    allowed.add(name)
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for line in requires:
      req = Requirement(line)
      if req.marker is None or req.marker.evaluate({"extra": ""}):
        todo.append(req.name)
  carried = {_canonical(r.split("==")[0]) for r in device_check.CARRIED_WHEELS.values()}
  return allowed | carried | TOOLING


_IMPORT_SCRIPT = """
import importlib.metadata, json, sys
for name in json.loads(sys.argv[1]):
  sys.modules[name] = None  # import and importlib.util.find_spec both see it as absent
sys.path.insert(0, sys.argv[2])
import device_check
modules = device_check.import_project()
device_check.render_smoke(modules)
dists = importlib.metadata.packages_distributions()
tops = sorted({n.split(".")[0] for n, m in list(sys.modules.items()) if m is not None})
print(json.dumps({t: [dists.get(t, []), getattr(sys.modules[t], "__file__", None)]
                  for t in tops}))
"""


def test_carried_wheels_complete_every_import_of_the_check():
  import importlib.metadata

  allowed = _allowed_distributions()
  owners: dict[str, set[str]] = {}
  for module, dists in importlib.metadata.packages_distributions().items():
    owners.setdefault(module, set()).update(_canonical(d) for d in dists)
  hidden = sorted(m for m, dists in owners.items()
                  if not dists & allowed and m not in sys.stdlib_module_names)
  out = subprocess.run(
      [sys.executable, "-c", _IMPORT_SCRIPT, json.dumps(hidden), str(ROOT / "benchmarks")],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, (
      f"the device check's imports fail with only the bare packages and the carried wheels "
      f"visible (hidden: {hidden}):\n{out.stderr[-3000:]}")
  imported = json.loads(out.stdout.strip().splitlines()[-1])
  stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
  strays = {}
  for module, (dists, path) in imported.items():
    if module in PROJECT_MODULES or module in sys.stdlib_module_names:
      continue
    if dists:
      if not {_canonical(d) for d in dists} & allowed:
        strays[module] = dists
    elif path and not Path(path).resolve().is_relative_to(stdlib):
      strays[module] = path
  assert not strays, f"imported from outside the bare packages and carried wheels: {strays}"
  unused = set(device_check.CARRIED_WHEELS) - set(imported)
  assert not unused, f"carried wheels the check never imports: {unused}"


def test_fetch_wheels_downloads_the_list():
  script = (ROOT / "scripts" / "fetch_wheels.sh").read_text()
  assert "--list_wheels" in script and "--only-binary=:all:" in script
  assert device_check.main(["--list_wheels"]) is None


def test_a_failed_stage_is_recorded_and_the_next_stages_still_report(tmp_path):
  result = device_check.main([f"--out_dir={tmp_path}", "--preset=llama3_8b",
                              "--stages=environment,tokenizer,setup,activations,pas_honest"])
  stages = result["stages"]
  assert stages["environment"]["status"] == "ok"
  assert stages["tokenizer"]["status"] == "ok"
  assert stages["setup"]["status"] == "failed"
  assert "no accelerator" in stages["setup"]["error"] and stages["setup"]["traceback"]
  assert stages["activations"]["status"] == "skipped"
  assert stages["pas_honest"]["status"] == "skipped"
  assert json.loads((tmp_path / "device_check.json").read_text())["ok"] is False
  assert "setup: failed" in (tmp_path / "device_check.txt").read_text()


def test_tiny_device_check_end_to_end_on_the_cpu(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable)
  run = subprocess.run(
      [str(ROOT / "scripts" / "device_check.sh"), str(out), "--preset=tiny", "--subjects=1",
       "--stages=environment,tokenizer,correctness,setup,activations,pas_paper"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  result = json.loads((out / "device_check.json").read_text())
  assert result["ok"], {k: v.get("error") for k, v in result["stages"].items()}
  env_stage = result["stages"]["environment"]
  assert env_stage["backend"] == "cpu" and env_stage["versions"]["jax"]

  checks = result["stages"]["correctness"]["checks"]
  assert {(c["preset"], c["dtype"]) for c in checks} == {("tiny", "float32"),
                                                          ("tiny", "bfloat16")}
  for check in checks:
    assert check["ok"] and check["max_abs_diff"] <= check["tolerance"]
    assert check["shape"] == [4, 10, 5] and check["steering_changes_by"] > 0

  setup = result["stages"]["setup"]
  assert setup["preset"] == "tiny" and setup["prompt_tokens"]["few_shot_max"] > 0
  # One PAS stage keeps the test short (XLA compiles dominate on a CPU); both run in
  # benchmarks/RESULTS_device.md's rehearsal and share `run_protocol`.
  paper = result["stages"]["pas_paper"]
  assert paper["selection"] == "oracle_test" and paper["subjects"] == 1
  for key in ("wall_s", "compile_s", "tokens_per_s", "executed_flops", "useful_flops",
              "mfu_executed", "mfu_useful", "predicted_s", "measured_over_planned"):
    assert paper[key] > 0, key
  assert paper["useful_flops"] <= paper["executed_flops"]
  assert paper["planned"]["seconds"] > 0 and paper["planned"]["programs"] > 0
  assert paper["projection_300"]["label"] == "EXTRAPOLATED"
  assert paper["projection_300"]["seconds"] > paper["wall_s"] - paper["compile_s"]
  assert "device_peak_mb" in paper  # None on a CPU
  summary = (out / "device_check.txt").read_text()
  assert "pas_paper: ok" in summary and "EXTRAPOLATED" in summary
  assert (out / "device_check.log").exists()
