"""The front door: runtime requirements are complete, a missing one is named in one line, CI
runs exactly the README's two commands, and launchers keep compiled programs in a persistent
cache by default."""

import ast
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

from launch import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL = {"palign_jax", "launch", "configs"}


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> set[str]:
  modules = set()
  for folder in ("palign_jax", "launch", "configs"):
    for path in (ROOT / folder).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          modules.add(node.module.split(".")[0])
  return {m for m in modules if m not in sys.stdlib_module_names and m not in LOCAL
          and m != "__future__"}


def test_every_runtime_import_is_a_pinned_requirement():
  pinned = {_normal(name) for name in common.runtime_requirements()}
  distributions = importlib.metadata.packages_distributions()
  missing = {}
  for module in _third_party_imports():
    names = {_normal(d) for d in distributions.get(module, [module])}
    if not names & pinned:
      missing[module] = sorted(names)
  assert not missing, f"imported at run time but not in requirements.txt: {missing}"
  # Imported lazily by transformers when a chat template is rendered, so no import finds it.
  assert "jinja2" in pinned


def test_each_requirement_names_an_importable_module():
  for name in common.runtime_requirements():
    assert importlib.metadata.version(name)
    __import__(common.module_of(name))


def test_requirements_check_names_the_missing_package(tmp_path):
  requirements = tmp_path / "requirements.txt"
  requirements.write_text("numpy==2.4.6\n# a comment\nno-such-package-xyz==1.0  # why\n")
  assert common.runtime_requirements(requirements) == ["numpy", "no-such-package-xyz"]
  message = common.missing_runtime_requirement(requirements)
  assert "'no-such-package-xyz'" in message and common.SETUP_COMMAND in message
  assert common.missing_runtime_requirement(tmp_path / "absent.txt") is None


def test_launcher_without_jinja2_says_so_in_one_line(tmp_path):
  script = ("import sys, runpy; sys.modules['jinja2'] = None; "
            f"sys.argv = ['evaluate', '--methods=constant_3', '--output_dir={tmp_path}']; "
            "runpy.run_module('launch.evaluate', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "'jinja2'" in lines[0] and "bash scripts/setup.sh" in lines[0]
  assert not (tmp_path / "records.jsonl").exists()


def test_ci_runs_the_readme_commands_in_order():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  main, tests = "bash scripts/quickstart.sh", "bash scripts/test.sh"
  assert f"\n    {main}\n" in readme and f"\n    {tests}\n" in readme
  assert readme.index(main) < readme.index(tests)
  runs = [line.strip() for line in ci.splitlines() if line.strip().startswith("bash scripts/")]
  assert runs[0].startswith(main) and runs[1] == f"{tests} || exit 1"
  assert any(r.startswith(f"{tests} -m slow") for r in runs[2:])
  # The main command installs the runtime requirements only, before the test requirements.
  quickstart = (ROOT / "scripts" / "quickstart.sh").read_text()
  assert "bash scripts/setup.sh\n" in quickstart and "setup.sh --test" not in quickstart


def test_compilation_cache_folder_follows_the_config(tmp_path, monkeypatch):
  from configs import default

  monkeypatch.setenv("PALIGN_JAX_CACHE", str(tmp_path))
  settings = default.get_config().compile_cache
  assert common.compilation_cache_dir(settings) == str(tmp_path / "xla")
  assert common.compilation_cache_dir(settings, "/jax/own") == "/jax/own"
  settings.dir = str(tmp_path / "elsewhere")
  assert common.compilation_cache_dir(settings, "/jax/own") == str(tmp_path / "elsewhere")
  settings.enabled = False
  assert common.compilation_cache_dir(settings) is None


def _plan_on_cpu(cache_root, *overrides):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(PALIGN_JAX_CACHE=str(cache_root), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.plan", "--model=smollm2", "--subjects=1",
                         "--device=cpu", *overrides], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_launcher_writes_compiled_programs_to_the_default_cache(tmp_path):
  # launch.plan compiles one program on a CPU (the matmul that measures the peak); every
  # program is kept at a zero threshold.
  on = _plan_on_cpu(tmp_path / "on", "--config.compile_cache.min_compile_time_s=0")
  assert on.returncode == 0, on.stderr[-2000:]
  written = [f.name for f in (tmp_path / "on" / "xla").iterdir()]
  assert any(name.startswith("jit_") and name.endswith("-cache") for name in written), written
  off = _plan_on_cpu(tmp_path / "off", "--config.compile_cache.enabled=False")
  assert off.returncode == 0, off.stderr[-2000:]
  assert not (tmp_path / "off" / "xla").exists()
