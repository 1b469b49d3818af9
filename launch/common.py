"""What every launcher shares: a runtime check, and running `main` so errors print as one line.

Each launcher calls `require_runtime()` before its other imports: it imports every runtime
requirement (`requirements.txt`), so a missing package is reported by name with the setup
command instead of surfacing later as a traceback from deep inside a library (transformers
imports jinja2 only when the first chat template is rendered). `run(main)` runs `main` under
absl, printing `UserInputError`s (and any late `ImportError`) as one line with exit status 2,
after turning on JAX's persistent compilation cache for launchers that take `--config`
(`enable_compilation_cache`, `config.compile_cache`). This module imports only the standard
library at import time, so the check itself cannot fail on a missing package.
"""

from __future__ import annotations

import importlib
import os
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
  # transformers advises at import that PyTorch was not found; the runtime needs no PyTorch
  # (models are Flax, transformers only tokenises), so the advice would only mislead.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  message = missing_runtime_requirement()
  if message:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def compilation_cache_dir(settings, jax_default: str | None = None) -> str | None:
  """Where compiled programs are kept between runs, or None when `settings.enabled` is off.

  settings: the config's `compile_cache` block (None: the defaults). An empty `dir` means JAX's
  own setting if one was made (`JAX_COMPILATION_CACHE_DIR`, passed as `jax_default`), else
  `$PALIGN_JAX_CACHE/xla` (`~/.cache/palign_jax/xla`), beside the model and activation caches.
  """
  if settings is not None and not settings.enabled:
    return None
  chosen = str(settings.dir) if settings is not None and settings.dir else jax_default
  if chosen:
    return os.path.expanduser(chosen)
  root = os.environ.get("PALIGN_JAX_CACHE") or os.path.join("~", ".cache", "palign_jax")
  return os.path.join(os.path.expanduser(root), "xla")


def enable_compilation_cache(settings) -> str | None:
  """Turns on JAX's persistent compilation cache as `settings` (`config.compile_cache`) say;
  returns its folder (None: off, JAX's own settings untouched). Must run before the first
  compile: JAX reads the folder once."""
  jax = sys.modules.get("jax")
  current = (jax.config.jax_compilation_cache_dir if jax is not None
             else os.environ.get("JAX_COMPILATION_CACHE_DIR"))
  path = compilation_cache_dir(settings, current)
  if path is None:
    return None
  # JAX skips programs that compile in under a second, which is most of a CPU's scoring
  # programs (0.5-2 s each for SmolLM2), so the threshold is the config's.
  minimum = 0.0 if settings is None else float(settings.min_compile_time_s)
  if jax is None:  # JAX reads these when imported, so a run that never imports it pays nothing
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(minimum)
  else:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
  return path


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, printing `UserInputError`s and `ImportError`s as one line (exit 2).
  A launcher with `--config` gets the persistent compilation cache its config asks for."""

  from absl import app, flags, logging

  from palign_jax.errors import UserInputError

  def guarded(argv: list[str]) -> None:
    # Libraries (orbax) log every checkpoint read at INFO; keep the console to our own output
    # unless asked (--verbosity=0 shows INFO again).
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      if "config" in _SHARED_FLAGS:
        enable_compilation_cache(_SHARED_FLAGS["config"].value.get("compile_cache"))
      main(argv)
    except UserInputError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except ImportError as e:  # a package a library imports lazily, e.g. jinja2 in transformers
      name = getattr(e, "name", None)
      what = f"'{name}' ({e})" if name and name not in str(e) else str(e).rstrip(".")
      print(f"error: a Python package is missing: {what}. Install the runtime with: "
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


# The process that holds this process's place in `jax.distributed` (see `init_distributed`).
_MEMBER = None

_MEMBER_CODE = """
import hashlib, json, sys
import jax, numpy as np
from jax.experimental import multihost_utils
settings = json.loads(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
try:
  if settings["auto"]:
    jax.distributed.initialize(initialization_timeout=settings["timeout_s"])
  else:
    jax.distributed.initialize(settings["coordinator_address"],
                               num_processes=settings["num_processes"],
                               process_id=settings["process_id"],
                               initialization_timeout=settings["timeout_s"])
except Exception as err:
  print("PALIGN_MEMBER", json.dumps({"error": str(err).splitlines()[0][:300]}), flush=True)
  sys.exit(1)
print("PALIGN_MEMBER", json.dumps({"process": jax.process_index(),
                                  "processes": jax.process_count()}), flush=True)
line = sys.stdin.readline()
if not line:  # this process failed before the check: leave, and the others will see it
  sys.exit(1)
digest = hashlib.sha256(line.encode()).digest()[:8]
mine = np.frombuffer(digest, np.int32)  # two int32s: JAX runs without 64-bit integers
everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
differ = [i for i in range(len(everyone)) if (everyone[i] != everyone[0]).any()]
print("PALIGN_MEMBER", json.dumps({"differ": differ}), flush=True)
jax.distributed.shutdown()
"""


DISTRIBUTED_MODES = ("independent", "pod")


def distributed_mode(config) -> str:
  """`config.distributed.mode`, checked."""
  from palign_jax.errors import UserInputError

  mode = str(config.distributed.get("mode", "independent"))
  if mode not in DISTRIBUTED_MODES:
    raise UserInputError(f"config.distributed.mode={mode!r}: expected one of "
                         f"{DISTRIBUTED_MODES}")
  return mode


def _join_pod(settings: dict) -> tuple[int, int]:
  """Pod mode: this process itself joins `jax.distributed` for the whole run."""
  import jax

  from palign_jax.errors import UserInputError

  # CPU devices across processes talk through gloo (accelerators ignore the setting). Nothing
  # here may touch a backend before `initialize`.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if settings["auto"]:
      jax.distributed.initialize(initialization_timeout=settings["timeout_s"])
    else:
      jax.distributed.initialize(settings["coordinator_address"],
                                 num_processes=settings["num_processes"],
                                 process_id=settings["process_id"],
                                 initialization_timeout=settings["timeout_s"])
  except Exception as err:
    raise UserInputError("config.distributed (pod): could not join the other processes "
                         f"({str(err).splitlines()[0][:300]}; settings {settings})") from None
  return jax.process_index(), jax.process_count()


def init_distributed(config) -> tuple[int, int]:
  """Joins the run's processes through `jax.distributed` when the config asks for several
  (`config.distributed`); returns (this process's index, the number of processes).

  Pod mode (`config.distributed.mode="pod"`): this process joins for the whole run, so the
  mesh spans every process's devices (`parallel.mesh_from_config`) and every process runs the
  same program over all subjects; a process that dies stops the others.

  The membership is held by a small companion process (CPU only, gloo collectives): it joins
  with these settings (or JAX's auto-detection: TPU, SLURM, Open MPI), reports the index and
  count, runs `check_same_run`'s all-gather, and leaves. This process itself stays a single
  controller over its own devices: PAS needs no collective across processes, a process that
  dies mid-run cannot take the others down (JAX's coordination service would stop them all),
  and its orbax caches stay process-local.
  """
  import json
  import subprocess
  import sys

  from palign_jax.errors import UserInputError

  global _MEMBER
  d = config.distributed
  mode = distributed_mode(config)
  if not d.auto and int(d.num_processes) <= 1:
    return 0, 1
  if not d.auto and not d.coordinator_address:
    raise UserInputError(f"config.distributed.num_processes={d.num_processes} needs "
                         "config.distributed.coordinator_address (host:port of process 0)")
  settings = {"auto": bool(d.auto), "coordinator_address": str(d.coordinator_address),
              "num_processes": int(d.num_processes), "process_id": int(d.process_id),
              "timeout_s": int(d.timeout_s)}
  if mode == "pod":
    return _join_pod(settings)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"  # the companion must not claim this process's accelerators
  _MEMBER = subprocess.Popen([sys.executable, "-c", _MEMBER_CODE, json.dumps(settings)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
  reply = _member_reply(_MEMBER)
  if "process" not in reply:
    raise UserInputError("config.distributed: could not join the other processes "
                         f"({reply.get('error', 'no reply from jax.distributed')}; settings "
                         f"{settings})")
  return int(reply["process"]), int(reply["processes"])


def _member_reply(member) -> dict:
  """The companion's next message ({} if it ended first); other output (gloo's) is skipped."""
  import json

  for line in member.stdout:
    if line.startswith("PALIGN_MEMBER "):
      return json.loads(line.split(" ", 1)[1])
  return {}


def work_of_process(config, subject_ids, process: int, processes: int
                    ) -> tuple[list[str], str, bool]:
  """(the subjects this process runs, the records file it reads as its own, whether it writes).

  Independent mode: every `processes`-th subject, its own shard, written by itself. Pod mode:
  every subject (one program over every process's devices), `records.jsonl`, written by
  process 0 alone.
  """
  from palign_jax import parallel, store

  if processes > 1 and distributed_mode(config) == "pod":
    return list(subject_ids), store.RECORDS_FILE, process == 0
  return (parallel.subjects_of_process(subject_ids, process, processes),
          store.shard_file(process, processes), True)


def refuse_in_pod(config, processes: int, what: str) -> None:
  """DPO trains per-row adapters with host-side batching not yet written for global arrays."""
  from palign_jax.errors import UserInputError

  if processes > 1 and distributed_mode(config) == "pod":
    raise UserInputError(f"{what} does not run in pod mode yet; use "
                         "--config.distributed.mode=independent (each process trains its own "
                         "subjects' adapters)")


def sync_processes(config, processes: int, name: str) -> None:
  """Pod mode: waits until every process gets here (e.g. every store opened before process 0
  appends to it, so all see the same work to do). Nothing otherwise."""
  if processes > 1 and distributed_mode(config) == "pod":
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _pod_processes_that_differ(identity: dict) -> list[int]:
  import hashlib
  import json

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  line = json.dumps(identity, sort_keys=True)
  mine = np.frombuffer(hashlib.sha256(line.encode()).digest()[:8], np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [i for i in range(len(everyone)) if (everyone[i] != everyone[0]).any()]


def check_same_run(identity: dict, process: int, processes: int) -> None:
  """Refuses to start when the processes disagree on what they run (config, model, prompts,
  seed): their results could not be merged. Waits for every process to get here."""
  import json

  from palign_jax.errors import UserInputError

  global _MEMBER
  if processes == 1:
    return
  if _MEMBER is None:  # pod mode: this process is in jax.distributed itself
    differ = _pod_processes_that_differ(identity)
    if differ:
      raise UserInputError(f"process {process}: processes {differ} run another "
                           "configuration or model than process 0 (config, model fingerprint, "
                           "prompts or seed differ); start every process with the same "
                           "--config and --model")
    return
  member, _MEMBER = _MEMBER, None
  member.stdin.write(json.dumps(identity, sort_keys=True) + "\n")
  member.stdin.flush()
  reply = _member_reply(member)
  member.wait()
  if "differ" not in reply:
    raise UserInputError(f"process {process}: another process left before the start-up check "
                         "(it failed or was stopped); see its log, then start them all again")
  if reply["differ"]:
    raise UserInputError(f"process {process}: processes {reply['differ']} run another "
                         "configuration or model than process 0 (config, model fingerprint, "
                         "prompts or seed differ); start every process with the same --config "
                         "and --model")
