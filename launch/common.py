"""What every launcher shares: running `main` so user errors print without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from palign_jax.errors import UserInputError  # noqa: F401  (re-exported for launchers)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, printing `UserInputError`s as one line and exiting with 2."""

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

  app.run(guarded)
