"""Shared fixtures: a tiny random-weight Llama folder with SmolLM2's real tokenizer.

The weights are random (so tests are fast) but the tokenizer and chat template are the real
ones from the installed SmolLM2 GGUF, so prompts, prefix sharing and letter reading are
exercised exactly as with the real model.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from palign_jax.models import config as config_lib
from palign_jax.models import params as params_lib

TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 8192,
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
  """Model/activation caches go to a temporary folder, never the user's home."""
  old = os.environ.get("PALIGN_JAX_CACHE")
  os.environ["PALIGN_JAX_CACHE"] = str(tmp_path_factory.mktemp("palign_cache"))
  yield
  if old is None:
    os.environ.pop("PALIGN_JAX_CACHE", None)
  else:
    os.environ["PALIGN_JAX_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A Hugging Face folder: config.json, random safetensors, SmolLM2's tokenizer files."""
  from palign_jax.models import gguf as gguf_lib
  from palign_jax.models import tokenizer as tokenizer_lib

  folder = tmp_path_factory.mktemp("tiny_llama")
  config = config_lib.from_hf_config(TINY_HF_CONFIG)
  rng = np.random.default_rng(0)
  tensors = {}
  for name, shape in params_lib.expected_hf_shapes(config).items():
    if name.endswith("norm.weight"):
      tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      tensors[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
  tokenizer = tokenizer_lib.tokenizer_from_gguf(gguf_lib.default_gguf_path())
  tokenizer.save_pretrained(folder)
  return folder


def tiny_run_config(model_dir, **overrides):
  """configs/default.py sized for the tiny model: 2 subjects, 2 fixed alphas, 2 folds, 6 heads."""
  from configs import default
  config = default.get_config()
  config.model = str(model_dir)
  config.subjects = "0:2"
  config.subjects_per_batch = 2
  config.pas.top_k = 6
  config.pas.alpha_grid = "fixed"
  config.pas.alphas = (0.0, 4.0)
  config.pas.folds = 2
  config.scoring.question_batch = 32
  config.scoring.prefix_batch = 2
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
  from palign_jax import engine
  return engine.Engine.from_config(tiny_run_config(tiny_model_dir))
