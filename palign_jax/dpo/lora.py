"""Low-rank adapters (LoRA; Hu et al., 2021) for the attention projections of `models.llama`.

Owns the trainable form of an adapter and how it becomes what `llama.forward(..., adapters=)`
takes. An adapter is a pytree `{target: {"a": [..., layers, in, rank], "b": [..., layers,
rank, out]}}` for targets among q/k/v/o_proj (`llama.ADAPTER_TARGETS`); the model adds
`(x a) b * scale` to the frozen projection `x W`, with `scale = alpha / rank` (`lora_scale`).

Initialisation is the paper's: `a` random (uniform in +-1/sqrt(in), PEFT's default Kaiming
bound), `b` zero, so an untrained adapter is exactly the base model and the first steps move
it smoothly. Training updates `a` and `b`; `for_forward` folds the scale into `b`, so the model
never needs to know it (and a saved forward-form adapter scores the same anywhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import ADAPTER_TARGETS, adapter_dims

Adapters = dict  # {target: {"a": array, "b": array}}


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
  """`"q_proj,v_proj"` or a sequence -> the targets in `ADAPTER_TARGETS` order; raises
  ValueError on an unknown or empty list."""
  names = spec.split(",") if isinstance(spec, str) else list(spec)
  names = {n.strip() for n in names if n.strip()}
  unknown = sorted(names - set(ADAPTER_TARGETS))
  if unknown or not names:
    raise ValueError(f"LoRA targets {unknown or '(none)'}: choose among {ADAPTER_TARGETS}")
  return tuple(t for t in ADAPTER_TARGETS if t in names)


def init_adapters(key: jax.Array, config: ModelConfig, *, rank: int, targets: Sequence[str],
                  lead: tuple[int, ...] = ()) -> Adapters:
  """Fresh adapters: `a` f32[*lead, layers, in, rank] uniform in +-1/sqrt(in), `b` zeros
  f32[*lead, layers, rank, out]. `lead` stacks independent adapters (e.g. `(subjects,)`)."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  out = {}
  for i, target in enumerate(parse_targets(targets)):
    d_in, d_out = adapter_dims(config, target)
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, config.num_layers, d_in, rank),
                           jnp.float32, -bound, bound)
    out[target] = {"a": a, "b": jnp.zeros((*lead, config.num_layers, rank, d_out), jnp.float32)}
  return out


def lora_scale(alpha: float, rank: int) -> float:
  """The LoRA scale `alpha / rank`: the update's size does not change with the rank."""
  return float(alpha) / int(rank)


def for_forward(adapters: Adapters, scale: float | jax.Array) -> Adapters:
  """The form `llama.forward` takes: `b` multiplied by the scale (same shapes)."""
  return {t: {"a": f["a"], "b": f["b"] * scale} for t, f in adapters.items()}


def num_parameters(adapters: Adapters, lead: int = 0) -> int:
  """Trainable parameters of one adapter (leaves' sizes without their first `lead` axes)."""
  return sum(int(np.prod(np.shape(x)[lead:])) for x in jax.tree.leaves(adapters))


def to_numpy(adapters: Adapters) -> Adapters:
  """The same pytree as float32 numpy arrays (for results and checkpoints)."""
  return jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
