"""Alignment profiles: one subject's alignment (PAS steering, DPO adapters), saved and restored
with orbax.

A profile is what it takes to move a model towards one person: the context (the system prompt
it was aligned under), and PAS steering (the kept heads, their directions and sigmas, the chosen
alpha) and/or LoRA adapters (DPO, forward form). A PAS profile (`profile_from_alignment`) has
the subject's few-shot prompt and steering; a DPO profile (`profile_from_dpo`) has the default
system prompt and the adapter trained for the chosen number of steps, no steering. It records
the model's fingerprint and the prompt version, and loading it for another model is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from palign_jax import prompts
from palign_jax.errors import UserInputError
from palign_jax.models import loading

FORMAT_VERSION = 2  # 2: adapters and `method`; version 1 files (PAS only) still load
READABLE_VERSIONS = (1, 2)
METHODS = ("pas", "dpo")
_STEERING_FIELDS = ("head_mask", "directions", "sigma")


@dataclasses.dataclass
class AlignmentProfile:
  """A subject's alignment to one model."""

  subject_id: str
  model_fingerprint: str
  model_source: str
  prompt_version: str
  system_prompt: str
  alpha: float  # 0 without steering
  alpha_selection: str  # "kfold_known" (honest; DPO: the number of steps) or "oracle_test"
  known_answers: np.ndarray  # int[120]
  head_mask: np.ndarray | None  # bool[layers, heads]; None: no steering (a DPO profile)
  directions: np.ndarray | None  # f32[layers, heads, head_dim], unit length on kept heads
  sigma: np.ndarray | None  # f32[layers, heads]
  settings: dict = dataclasses.field(default_factory=dict)
  method: str = "pas"  # how it was aligned, one of METHODS
  adapters: dict | None = None  # LoRA factors in forward form (the scale folded into b):
  #   {target: {"a": f32[layers, in, rank], "b": f32[layers, rank, out]}}; None: none

  @property
  def has_steering(self) -> bool:
    return self.head_mask is not None

  def steering(self, alpha: float | None = None) -> np.ndarray | None:
    """`f32[layers, heads, head_dim]`: alpha * sigma * direction on the kept heads; None for a
    profile without steering."""
    if not self.has_steering:
      return None
    alpha = self.alpha if alpha is None else alpha
    scale = alpha * self.sigma * self.head_mask
    return (scale[..., None] * self.directions).astype(np.float32)


def profile_from_alignment(alignment, *, model_fingerprint: str, model_source: str,
                           known_answers: np.ndarray, selection: str, decoding: str,
                           settings: dict) -> AlignmentProfile:
  """The profile of one `SubjectAlignment`, steering at the alpha `selection` chose for
  `decoding` (the context is the subject's few-shot prompt from all known answers).

  The honest alpha was validated on the fold fits, and the fit on all known items steers
  harder per unit alpha, so a `kfold_known` profile steers with the mean of the fold fits'
  vectors (`steering_fields`); an `oracle_test` profile with the full fit, as the paper.
  """
  head_mask, directions, sigma = alignment.head_mask, alignment.directions, alignment.sigma
  steering_source = "full fit"
  if selection == "kfold_known" and alignment.fold_steering is not None:
    head_mask, directions, sigma = steering_fields(alignment.fold_steering.mean(0))
    steering_source = f"mean of the {len(alignment.fold_steering)} fold fits"
  return AlignmentProfile(
      subject_id=alignment.subject_id, model_fingerprint=model_fingerprint,
      model_source=model_source, prompt_version=prompts.PROMPT_VERSION,
      system_prompt=prompts.few_shot_system_prompt(known_answers),
      alpha=alignment.chosen_alpha[selection][decoding], alpha_selection=selection,
      known_answers=np.asarray(known_answers), head_mask=head_mask,
      directions=directions, sigma=sigma,
      settings=dict(settings, decoding=decoding, steering=steering_source))


def steering_fields(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(head_mask, directions, sigma)` whose alpha-1 steering is `unit` `[layers, heads, dim]`:
  sigma the per-head norm, directions the unit vectors, heads with no steering left out."""
  unit = np.asarray(unit, np.float32)
  sigma = np.linalg.norm(unit, axis=-1)
  head_mask = sigma > 0
  directions = np.where(head_mask[..., None], unit / np.where(head_mask, sigma, 1.0)[..., None],
                        0.0).astype(np.float32)
  return head_mask, directions, sigma.astype(np.float32)


def profile_from_dpo(result, *, model_fingerprint: str, model_source: str,
                     settings: dict) -> AlignmentProfile:
  """The profile of one `protocol.dpo.SubjectDpo`: the default system prompt it was trained and
  scored under, and its adapter at the chosen number of steps (none when the subject had no
  usable pairs: the profile is then the base model, and its settings say why)."""
  return AlignmentProfile(
      subject_id=result.subject_id, model_fingerprint=model_fingerprint,
      model_source=model_source, prompt_version=prompts.PROMPT_VERSION,
      system_prompt=prompts.DEFAULT_SYSTEM_PROMPT, alpha=0.0, alpha_selection="kfold_known",
      known_answers=np.asarray(result.known_answers), head_mask=None, directions=None,
      sigma=None, method="dpo", adapters=result.adapters,
      settings=dict(settings, decoding=result.chosen_decoding, steps=result.chosen_steps,
                    learning_rate=(None if np.isnan(result.chosen_learning_rate)
                                   else result.chosen_learning_rate),
                    num_pairs=result.num_pairs, note=result.note))


def save_profile(path: str | pathlib.Path, profile: AlignmentProfile) -> pathlib.Path:
  """Writes the profile as an orbax checkpoint directory (replacing an older one)."""
  path = pathlib.Path(path).absolute()
  if profile.method not in METHODS:
    raise UserInputError(f"profile method {profile.method!r} is not one of {METHODS}")
  if not profile.has_steering and profile.alpha:
    raise UserInputError("a profile without steering must have alpha 0")
  arrays = {"known_answers": np.asarray(profile.known_answers, np.int32)}
  if profile.has_steering:
    arrays.update(head_mask=np.asarray(profile.head_mask, np.int32),
                  directions=np.asarray(profile.directions, np.float32),
                  sigma=np.asarray(profile.sigma, np.float32))
  if profile.adapters is not None:
    arrays["adapters"] = {t: {k: np.asarray(v, np.float32) for k, v in f.items()}
                          for t, f in profile.adapters.items()}
  meta = {f.name: getattr(profile, f.name) for f in dataclasses.fields(profile)
          if f.name not in ("known_answers", "adapters", *_STEERING_FIELDS)}
  meta["format_version"] = FORMAT_VERSION
  with loading.host_checkpointer() as checkpointer:
    checkpointer.save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                               meta=ocp.args.JsonSave(meta)), force=True)
  return path


def load_profile(path: str | pathlib.Path, *, model_fingerprint: str | None = None,
                 prompt_version: str | None = None) -> AlignmentProfile:
  """Restores a profile; refuses one made for another model or prompt version."""
  path = pathlib.Path(path).absolute()
  if not (path / "meta").exists():
    raise UserInputError(f"{path}: not an alignment profile (no 'meta' inside); profiles are "
                         "written by `python -m launch.align`")
  with loading.host_checkpointer() as checkpointer:
    restored = checkpointer.restore(path, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta, arrays = dict(restored["meta"]), restored["arrays"]
  version = meta.pop("format_version", None)
  if version not in READABLE_VERSIONS:
    raise UserInputError(f"{path}: profile format version {version} is not one this code reads "
                         f"{READABLE_VERSIONS}; align the subject again")
  if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
    raise UserInputError(
        f"{path}: this profile was made for model {meta['model_source']} (fingerprint "
        f"{meta['model_fingerprint']}), not the loaded model (fingerprint {model_fingerprint}). "
        "Steering directions and LoRA adapters only mean something for the model they were "
        "found on: align the subject again with this model (python -m launch.align).")
  if prompt_version is not None and meta["prompt_version"] != prompt_version:
    raise UserInputError(f"{path}: profile uses prompt version {meta['prompt_version']!r}, "
                         f"this code uses {prompt_version!r}; align the subject again")
  steering = "head_mask" in arrays
  adapters = arrays.get("adapters")
  return AlignmentProfile(
      known_answers=np.asarray(arrays["known_answers"]),
      head_mask=np.asarray(arrays["head_mask"]).astype(bool) if steering else None,
      directions=np.asarray(arrays["directions"]) if steering else None,
      sigma=np.asarray(arrays["sigma"]) if steering else None,
      adapters=None if adapters is None else {
          t: {k: np.asarray(v, np.float32) for k, v in f.items()} for t, f in adapters.items()},
      **meta)


def profile_paths(spec: str | pathlib.Path | list) -> list[pathlib.Path]:
  """The profile directories a spec names, sorted: a list of paths, a comma-separated string of
  them, a glob (`runs/*/profiles/*`), a folder of profiles (`runs/me/profiles`) or a run
  directory holding `profiles/`. Raises when it names none."""
  items = spec if isinstance(spec, list | tuple) else [s for s in str(spec).split(",") if s]
  found = []
  for item in map(str, items):
    path = pathlib.Path(item)
    if any(c in item for c in "*?["):
      found += [pathlib.Path(p) for p in sorted(glob.glob(item))
                if (pathlib.Path(p) / "meta").exists()]
    elif (path / "meta").exists():
      found.append(path)
    elif path.is_dir():
      folder = path / "profiles" if (path / "profiles").is_dir() else path
      found += sorted(p for p in folder.iterdir() if (p / "meta").exists())
    else:
      raise UserInputError(f"{item}: no such profile, folder of profiles or glob (--profiles)")
  if not found:
    raise UserInputError(f"--profiles {spec!r} names no alignment profile (directories written "
                         "by launch.align, each with a 'meta' inside)")
  return list(dict.fromkeys(p.absolute() for p in found))


def load_profiles(spec: str | pathlib.Path | list, *, model_fingerprint: str | None = None,
                  prompt_version: str | None = None
                  ) -> tuple[list[str], list[AlignmentProfile]]:
  """`(labels, profiles)` of every profile a spec names (`profile_paths`), each checked as by
  `load_profile` (one made for another model is refused by its path). A label is the subject
  id, or `id:method` where two profiles share an id; still equal labels are refused."""
  paths = profile_paths(spec)
  profiles = [load_profile(p, model_fingerprint=model_fingerprint,
                           prompt_version=prompt_version) for p in paths]
  ids = [p.subject_id for p in profiles]
  labels = [i if ids.count(i) == 1 else f"{i}:{p.method}" for i, p in zip(ids, profiles,
                                                                           strict=True)]
  for i, label in enumerate(labels):
    if label in labels[:i]:
      raise UserInputError(f"profiles {paths[labels.index(label)]} and {paths[i]} are both "
                           f"{label!r}; name one of them only")
  return labels, profiles
