"""palign-jax: personality alignment of language models (PAS) in JAX/Flax.

`palign_jax.api` is the Python API (load a model, align people, answer questionnaires and
generate for many profiles at once); it is imported on first use, so importing the package
itself stays light.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["api"]


def __getattr__(name: str):
  if name == "api":
    return importlib.import_module("palign_jax.api")
  raise AttributeError(f"module 'palign_jax' has no attribute {name!r}")
