"""Local Hugging Face checkpoint folders: `config.json` + `*.safetensors` -> config and tensors.

Reads Llama, Mistral, Qwen2 and Gemma 3 folders as written by
`save_pretrained(safe_serialization=True)`, single-file (`model.safetensors`) or sharded
(`model.safetensors.index.json` + shards), with the `safetensors` numpy API: no torch at run
time, bfloat16 arrives as `ml_dtypes.bfloat16`.
Gemma 3 4B-27B are image-text models (`Gemma3ForConditionalGeneration`): their text decoder is
read under its causal-LM names and the vision tower is never loaded.
Never downloads; a hub name is not a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16', which safetensors asks for)
import numpy as np
from safetensors import SafetensorError, safe_open

from palign_jax.errors import UserInputError
from palign_jax.models.config import ModelConfig, from_hf_config
from palign_jax.models.params import Params, expected_hf_shapes, params_from_hf_tensors

INDEX_FILE = "model.safetensors.index.json"
# Where an image-text Gemma 3 checkpoint keeps its text decoder: transformers < 4.52 (and
# save_pretrained since, which converts back) wrote the first, the in-memory model the second.
TEXT_DECODER_PREFIXES = ("language_model.model.", "model.language_model.")


def text_decoder_name(name: str) -> str:
  """A checkpoint tensor's name as the causal LM calls it (`model.layers.0...`)."""
  for prefix in TEXT_DECODER_PREFIXES:
    if name.startswith(prefix):
      return "model." + name[len(prefix):]
  return "lm_head.weight" if name == "language_model.lm_head.weight" else name


def read_config(folder: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of `folder/config.json`; UserInputError if missing or unsupported."""
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise UserInputError(f"{path}: config.json not found (is '{folder}' a model folder?)")
  try:
    hf = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise UserInputError(f"{path}: not valid JSON: {err}") from None
  if not isinstance(hf, dict):
    raise UserInputError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  return from_hf_config(flatten_rope_parameters(hf), source=str(path))


def flatten_rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
  """transformers >= 5 writes `rope_theta` and RoPE scaling inside `rope_parameters`.

  Copies them to the top-level `rope_theta` / `rope_scaling` keys that `from_hf_config`
  reads (older files already have those, and they win).
  """
  rope = hf.get("rope_parameters")
  if not isinstance(rope, dict) or not ("rope_theta" in rope or "rope_type" in rope):
    return hf
  hf = dict(hf)
  if "rope_theta" in rope:
    hf.setdefault("rope_theta", rope["rope_theta"])
  if rope.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
    hf["rope_scaling"] = rope
  return hf


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
  """The checkpoint's safetensors files: the shards an index names, else `*.safetensors`."""
  folder = Path(folder)
  index = folder / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
      raise UserInputError(f"{index}: not a valid safetensors index ({err!r})") from None
    files = [folder / name for name in names]
    for file in files:
      if not file.is_file():
        raise UserInputError(f"{index}: names shard '{file.name}', which is missing")
    return files
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise UserInputError(
        f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not supported; "
        "re-save with save_pretrained(safe_serialization=True))")
  return files


def read_safetensors(files: list[Path], wanted: set[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
  """`({name: array}, {name: file})` for the tensors in `files` (only `wanted` if given),
  named as the causal LM names them (`text_decoder_name`)."""
  tensors, origin = {}, {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for stored in f.keys():
          name = text_decoder_name(stored)
          if wanted is not None and name not in wanted:
            continue
          if name in tensors:
            raise UserInputError(f"{file}: tensor '{stored}' is also in {origin[name]}")
          tensors[name] = f.get_tensor(stored)
          origin[name] = file
    except (SafetensorError, OSError, ValueError) as err:
      raise UserInputError(f"{file}: not a readable safetensors file: {err}") from None
  return tensors, origin


def _check_shapes(config: ModelConfig, tensors: dict[str, Any], origin: dict[str, Path],
                  folder: Path) -> None:
  # params.check_hf_tensors names one source; here the message names the file that holds
  # the tensor (a shard), or the folder for a missing one.
  for name, shape in expected_hf_shapes(config).items():
    if name not in tensors:
      raise UserInputError(f"{folder}: tensor '{name}' is missing from the safetensors files")
    got = tuple(tensors[name].shape)
    if got != shape:
      raise UserInputError(
          f"{origin[name]}: tensor '{name}' has shape {got}, but {folder / 'config.json'} "
          f"implies {shape}")


def read_hf_folder(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads a local HF folder into `(config, {hf_name: array in HF orientation})`."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserInputError(f"{folder}: model folder not found")
  config = read_config(folder)
  wanted = set(expected_hf_shapes(config))
  tensors, origin = read_safetensors(safetensors_files(folder), wanted)
  _check_shapes(config, tensors, origin, folder)
  return config, tensors


def load_hf_folder(folder: str | os.PathLike, dtype: Any = np.float32
                   ) -> tuple[ModelConfig, Params]:
  """Reads a local HF folder into `(config, params)` with params in the `params.py` layout."""
  config, tensors = read_hf_folder(folder)
  return config, params_from_hf_tensors(config, tensors, dtype, source=str(folder))
