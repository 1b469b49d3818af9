"""User-facing errors: one exception type whose message is meant for a person.

Launchers catch `UserInputError` and print its message without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
  """Bad input from a user (a file, a field, a flag), with a readable message."""


def input_error(source: str, where: str, problem: str) -> UserInputError:
  """Builds an error that names the file (or flag), the place in it and the problem."""
  return UserInputError(f"{source}: {where}: {problem}")
