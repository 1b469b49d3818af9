"""Where arrays live: one device mesh with named axes, logical axes for the parameters, and the
shardings of batches. JAX's own runtime (`jax.sharding`, `jax.distributed`) does the rest.

The mesh has two axes, built from `config.mesh` (`data` x `model` = the process's devices):

* `data`: independent work is split over it: the (subject, alpha) contexts of a scoring batch
  and the subjects of a probe fit;
* `model`: the parameters are split over it (tensor parallelism): attention heads by key/value
  head (a device holds whole query groups, `models/params.py`), the MLP's hidden units and the
  vocabulary: one all-reduce after `o_proj` and one after `down_proj` per layer. With
  `config.mesh.fsdp`, the parameters are also split over `data` along the embedding axis
  (FSDP) and gathered layer by layer by XLA as they are used.

Model code never names mesh axes: every parameter leaf has logical axes (`PARAM_AXES`, in the
style of MaxText's `logical_axis_rules` and levanter's named axes) and `rules` maps them to
mesh axes once. A dimension that a mesh axis does not divide is replicated instead (e.g.
SmolLM2's 9 heads on 2 model shards); `plan` reports it. On one device every sharding is
trivial and the calling code is the same.

With several processes (`jax.distributed`, `launch.common.init_distributed`) there are two
modes (`config.distributed.mode`). "independent": each process builds its mesh from its own
devices (`jax.local_devices()`) and aligns its own share of the subjects; PAS is independent
per subject, so no collective crosses processes. "pod": one global mesh over every process's
devices (`global_devices`: hosts along `data`, each host's devices along `model` first), one
SPMD program that every process runs over all subjects; host data becomes global arrays
(`put_batch`, `replicate`: every process holds the same host copy and places its own shards)
and results come back to every host (`to_host`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from palign_jax.errors import UserInputError

MESH_AXES = ("data", "model")

# Logical axes of each leaf of the `models/params.py` pytree, by path.
PARAM_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("layers", "input_layernorm", "scale"): ("layers", "embed"),
    ("layers", "post_attention_layernorm", "scale"): ("layers", "embed"),
    ("layers", "attn", "qkv_proj", "kernel"): ("layers", "embed", "kv_heads", "qkv", "head_dim"),
    ("layers", "attn", "qkv_proj", "bias"): ("layers", "kv_heads", "qkv", "head_dim"),
    ("layers", "attn", "o_proj", "kernel"): ("layers", "heads", "head_dim", "embed"),
    ("layers", "mlp", "gate_up_proj", "kernel"): ("layers", "embed", "gate_up", "mlp"),
    ("layers", "mlp", "down_proj", "kernel"): ("layers", "mlp", "embed"),
    ("norm", "scale"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    # Gemma 3
    ("layers", "attn", "q_norm", "scale"): ("layers", "head_dim"),
    ("layers", "attn", "k_norm", "scale"): ("layers", "head_dim"),
    ("layers", "pre_feedforward_layernorm", "scale"): ("layers", "embed"),
    ("layers", "post_feedforward_layernorm", "scale"): ("layers", "embed"),
}


def rules(fsdp: bool = False) -> dict[str, str | None]:
  """Logical axis -> mesh axis (None: replicated)."""
  return {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model",
          "embed": "data" if fsdp else None, "layers": None, "head_dim": None, "qkv": None,
          "gate_up": None,
          "pairs": "data", "subjects": "data"}


def make_mesh(data: int = -1, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A `data` x `model` mesh over `devices` (default: this process's devices).

  data = -1 takes every device the model axis leaves. Raises `UserInputError` when the shape
  does not match the device count.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if model < 1 or (data != -1 and data < 1):
    raise UserInputError(f"config.mesh: data={data}, model={model}: sizes must be >= 1 (data "
                         "may be -1: every device the model axis leaves)")
  if data == -1:
    if len(devices) % model:
      raise UserInputError(f"config.mesh.model={model} does not divide the {len(devices)} "
                           f"devices of this process ({devices[0].platform})")
    data = len(devices) // model
  if data * model != len(devices):
    raise UserInputError(f"config.mesh: data={data} x model={model} = {data * model} devices, "
                         f"but this process has {len(devices)} ({devices[0].platform}); use "
                         f"data x model = {len(devices)} (data=-1 fills it)")
  return Mesh(np.array(devices).reshape(data, model), MESH_AXES)


def global_devices() -> list:
  """Every process's devices, host by host (process index, then id), so that a `model` axis
  no larger than a host's device count stays within one host and `data` crosses hosts."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def mesh_from_config(config) -> Mesh:
  """The mesh a run config asks for (`config.mesh.data`, `config.mesh.model`): over this
  process's devices, or over every process's in pod mode (`config.distributed.mode`)."""
  pod = str(config.get("distributed", {}).get("mode", "independent")) == "pod"
  return make_mesh(int(config.mesh.data), int(config.mesh.model),
                   global_devices() if pod else None)


def spans_processes(mesh: Mesh | None) -> bool:
  """True when some of the mesh's devices belong to other processes (pod mode)."""
  return mesh is not None and any(d.process_index != jax.process_index()
                                  for d in mesh.devices.flat)


def pod_agrees(value: bool) -> bool:
  """Process 0's `value` on every process of a pod run (alone: `value`). For choices that
  decide which collectives run, such as whether a cache entry is read or rebuilt: processes
  that chose differently would wait on each other forever."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def writes_host_caches() -> bool:
  """Whether this process writes the host-side caches (converted models, activations): in a
  pod run process 0 alone, so that no two processes write one entry."""
  return jax.process_index() == 0


def _global_array(host, sharding: NamedSharding):
  """A global array from a host array every process holds whole: each places its shards."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
  """A device array as numpy on this host; an array split across processes is gathered from
  all of them (every process must call this at the same point, as for any collective)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _spec(shape: Sequence[int], logical: Sequence[str], mesh: Mesh,
          axis_rules: dict[str, str | None]) -> tuple[PartitionSpec, list[str]]:
  """The partition spec of one array, and its logical axes left replicated because the mesh
  axis does not divide them."""
  spec, replicated, used = [], [], set()
  for size, name in zip(shape, logical, strict=True):
    axis = axis_rules.get(name)
    if axis is None or mesh.shape[axis] == 1 or axis in used:
      spec.append(None)
    elif size % mesh.shape[axis]:
      spec.append(None)
      replicated.append(f"{name} ({size} over {axis}={mesh.shape[axis]})")
    else:
      spec.append(axis)
      used.add(axis)
  return PartitionSpec(*spec), replicated


def param_shardings(params, mesh: Mesh, fsdp: bool = False):
  """A pytree of `NamedSharding`s matching `params` (arrays or `jax.ShapeDtypeStruct`s)."""
  axis_rules = rules(fsdp)

  def one(path, leaf):
    key = tuple(p.key for p in path)
    if key not in PARAM_AXES:
      raise ValueError(f"no logical axes for parameter {'/'.join(key)}")
    return NamedSharding(mesh, _spec(leaf.shape, PARAM_AXES[key], mesh, axis_rules)[0])

  return jax.tree_util.tree_map_with_path(one, params)


def replicated_axes(params, mesh: Mesh, fsdp: bool = False) -> list[str]:
  """Logical axes the rules would shard but the mesh does not divide (so they are copied)."""
  out = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = tuple(p.key for p in path)
    out.update(_spec(leaf.shape, PARAM_AXES[key], mesh, rules(fsdp))[1])
  return sorted(out)


def shard_params(params, mesh: Mesh, fsdp: bool = False):
  """Places every parameter on the mesh according to its logical axes."""
  return place(params, param_shardings(params, mesh, fsdp))


def place(tree, shardings):
  """`jax.device_put(tree, shardings)`, also for shardings that span processes (pod mode),
  where each process places its own shards from its host copy."""
  leaves = jax.tree.leaves(shardings)
  if leaves and any(spans_processes(s.mesh) for s in leaves if isinstance(s, NamedSharding)):
    return jax.tree.map(_global_array, tree, shardings)
  return jax.device_put(tree, shardings)


def batch_sharding(mesh: Mesh, rows: int, ndim: int) -> NamedSharding:
  """The sharding of an `[rows, ...]` batch: rows split over `data` when it divides them."""
  data = mesh.shape["data"]
  lead = "data" if data > 1 and rows % data == 0 else None
  return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def constrain_rows(mesh: Mesh | None, tree, axis: int = 0):
  """Inside `jit`: every leaf's `axis` (its rows) split over `data` when it divides them, its
  other axes left to XLA (so a cache's kv heads stay split over `model`). Outside a mesh,
  `tree` unchanged. The compiled program then keeps each device to its own rows, whatever
  the inputs' placement (`batch_sharding` is the same rule for arrays sent from the host)."""
  if mesh is None:
    return tree
  data = mesh.shape["data"]

  def one(x):
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[axis] = "data" if data > 1 and x.shape[axis] % data == 0 else None
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))

  return jax.tree.map(one, tree)


def put_batch(mesh: Mesh | None, array):
  """`array` on the mesh, rows split over `data` (unchanged without a mesh)."""
  if mesh is None:
    return array
  sharding = batch_sharding(mesh, np.shape(array)[0], np.ndim(array))
  if spans_processes(mesh) and not isinstance(array, jax.Array):
    return _global_array(array, sharding)
  return jax.device_put(array, sharding)


def replicate(mesh: Mesh | None, array):
  """`array` on every device of the mesh (unchanged without a mesh)."""
  if mesh is None:
    return array
  sharding = NamedSharding(mesh, PartitionSpec())
  if spans_processes(mesh) and not isinstance(array, jax.Array):
    return _global_array(array, sharding)
  return jax.device_put(array, sharding)


def subjects_of_process(subject_ids: Sequence[str], process: int, processes: int) -> list[str]:
  """This process's share of the subjects: every `processes`-th one, from `process` on, so
  shares stay balanced and a subject always lands on the same process."""
  return list(subject_ids[process::processes])


# --- rows of independent training (DPO adapters) -----------------------------------------------

def padded_rows(rows: int, mesh: Mesh | None) -> int:
  """`rows` rounded up to a multiple of the mesh's `data` axis (unchanged without a mesh), so
  every device holds the same number of whole rows; the caller masks the padding."""
  data = 1 if mesh is None else mesh.shape["data"]
  return -(-rows // data) * data


def rows_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Dimension `axis` of an `ndim`-array split over `data`, the rest replicated. Unlike
  `batch_sharding` it never falls back to replication: the rows must divide (`padded_rows`)."""
  spec = [None] * ndim
  spec[axis] = "data"
  return NamedSharding(mesh, PartitionSpec(*spec))


def put_rows(mesh: Mesh | None, tree, axis: int = 0):
  """Every leaf of `tree` on the mesh with dimension `axis` split over `data` (unchanged
  without a mesh)."""
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: jax.device_put(x, rows_sharding(mesh, np.ndim(x), axis)), tree)
