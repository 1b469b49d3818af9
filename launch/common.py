"""What every launcher shares: a runtime check, and running `main` so errors print as one line.

Each launcher calls `require_runtime()` before its other imports: it imports every runtime
requirement (`requirements.txt`), so a missing package is reported by name with the setup
command instead of surfacing later as a traceback from deep inside a library (transformers
imports jinja2 only when the first chat template is rendered). `run(main)` runs `main` under
absl, printing `UserInputError`s (and any late `ImportError`) as one line with exit status 2.
This module imports only the standard library at import time, so the check itself cannot fail
on a missing package.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys
from collections.abc import Callable

REQUIREMENTS = pathlib.Path(__file__).resolve().parent.parent / "requirements.txt"
SETUP_COMMAND = "bash scripts/setup.sh"
# Distribution name -> the module it provides, where the two differ.
MODULE_OF = {"absl-py": "absl", "orbax-checkpoint": "orbax.checkpoint", "jaxlib": "jaxlib"}


def runtime_requirements(path: pathlib.Path = REQUIREMENTS) -> list[str]:
  """Distribution names pinned in a requirements file (comments and options skipped)."""
  names = []
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line and not line.startswith("-"):
      names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
  return names


def module_of(distribution: str) -> str:
  return MODULE_OF.get(distribution, distribution.replace("-", "_"))


def missing_runtime_requirement(path: pathlib.Path = REQUIREMENTS) -> str | None:
  """A one-line message naming the first runtime requirement that cannot be imported, or None.

  Without a requirements file (the package installed on its own) there is nothing to check.
  """
  if not path.is_file():
    return None
  for distribution in runtime_requirements(path):
    try:
      importlib.import_module(module_of(distribution))
    except ImportError as err:
      return (f"the Python package '{distribution}' ({path.name}) cannot be imported by "
              f"{sys.executable} ({err}); install the runtime with: {SETUP_COMMAND}")
  return None


def require_runtime() -> None:
  """Exits with a one-line message (status 2) if a runtime requirement is missing."""
  message = missing_runtime_requirement()
  if message:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, printing `UserInputError`s and `ImportError`s as one line (exit 2)."""

  from absl import app, flags, logging

  from palign_jax.errors import UserInputError

  def guarded(argv: list[str]) -> None:
    # Libraries (orbax) log every checkpoint read at INFO; keep the console to our own output
    # unless asked (--verbosity=0 shows INFO again).
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserInputError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except ImportError as e:  # a package a library imports lazily, e.g. jinja2 in transformers
      missing = getattr(e, "name", None) or str(e)
      print(f"error: a Python package is missing ({missing}): {e}. Install the runtime with: "
            f"{SETUP_COMMAND}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py"
_SHARED_FLAGS: dict = {}  # defined once per process, so launchers can be imported together


def config_flag():
  """`--config` (a configs/*.py file, fields overridable as --config.FIELD=VALUE), the same
  flag in every launcher, so every setting has one source: the config."""
  if "config" not in _SHARED_FLAGS:
    from ml_collections import config_flags

    _SHARED_FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG),
        "Run configuration: a configs/*.py file returning an ml_collections ConfigDict "
        "(default configs/default.py, which documents every field). Override fields with "
        "--config.FIELD=VALUE, e.g. --config.pas.top_k=48 --config.pas.alphas='(0,2,4)' "
        "--config.scoring.prefix_batch=8.")
  return _SHARED_FLAGS["config"]


def shorthand_flag(field: str, help_text: str):
  """`--FIELD`, a shorthand for `--config.FIELD` (no default of its own: the config's)."""
  if field not in _SHARED_FLAGS:
    from absl import flags

    _SHARED_FLAGS[field] = flags.DEFINE_string(
        field, None, f"Shorthand for --config.{field}: {help_text}")
  return _SHARED_FLAGS[field]


def output_dir_flag():
  """`--output_dir`; each launcher's default is runs/<launcher> (see `output_dir`)."""
  if "output_dir" not in _SHARED_FLAGS:
    from absl import flags

    _SHARED_FLAGS["output_dir"] = flags.DEFINE_string(
        "output_dir", None, "Where the run's records, results and profiles go (default "
        "runs/evaluate for launch.evaluate, runs/align for launch.align). Rerunning with the "
        "same directory resumes and skips what is done; a directory made by another model or "
        "configuration is refused, never overwritten.")
  return _SHARED_FLAGS["output_dir"]


def output_dir(launcher: str) -> str:
  return output_dir_flag().value or f"runs/{launcher}"


MODEL_HELP = ("'default' (the embedded SmolLM2-135M-Instruct GGUF), a .gguf file, or a local "
              "Hugging Face folder (config.json + safetensors + tokenizer files).")
SUBJECTS_HELP = ("'all' (the 300 PAPI subjects), comma-separated ids, 0-based ranges like "
                 "'0:8', or a CSV/JSON answers file with at least the 120 short-form items "
                 "(see examples/my_answers.csv).")


def resolved_config(config_holder, **overrides):
  """The config with the launcher's shorthand flags (`--model=...`) applied where given."""
  config = config_holder.value
  with config.unlocked():
    for field, value in overrides.items():
      if value is not None:
        config[field] = value
  return config


def init_distributed(config) -> tuple[int, int]:
  """Joins the run's processes through `jax.distributed` when the config asks for several
  (`config.distributed`); returns (this process's index, the number of processes)."""
  import jax

  from palign_jax.errors import UserInputError

  d = config.distributed
  if not d.auto and int(d.num_processes) <= 1:
    return 0, 1
  if jax.distributed.is_initialized():
    return jax.process_index(), jax.process_count()
  try:
    # CPU processes exchange the start-up check over gloo (accelerators use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.auto:
      jax.distributed.initialize(initialization_timeout=int(d.timeout_s))
    else:
      if not d.coordinator_address:
        raise UserInputError(f"config.distributed.num_processes={d.num_processes} needs "
                             "config.distributed.coordinator_address (host:port of process 0)")
      jax.distributed.initialize(d.coordinator_address, num_processes=int(d.num_processes),
                                 process_id=int(d.process_id),
                                 initialization_timeout=int(d.timeout_s))
  except (RuntimeError, ValueError) as err:
    raise UserInputError(f"config.distributed: could not join the other processes ({err})") \
        from None
  return jax.process_index(), jax.process_count()


def check_same_run(identity: dict, process: int, processes: int) -> None:
  """Refuses to start when the processes disagree on what they run (config, model, prompts):
  their results could not be merged."""
  if processes == 1:
    return
  import hashlib
  import json

  import numpy as np
  from jax.experimental import multihost_utils

  from palign_jax.errors import UserInputError

  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()[:8]
  mine = np.frombuffer(digest, np.int32)  # two int32s: JAX runs without 64-bit integers
  everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(processes, -1)
  differ = [i for i in range(processes) if (everyone[i] != everyone[0]).any()]
  if differ:
    raise UserInputError(f"process {process}: processes {differ} run another configuration or "
                         "model than process 0 (config, model fingerprint, prompts or seed "
                         "differ); start every process with the same --config and --model")
