"""palign-jax: personality alignment of language models (PAS) in JAX/Flax."""

__version__ = "0.1.0"
