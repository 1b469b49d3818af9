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
