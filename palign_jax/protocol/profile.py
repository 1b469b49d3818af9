"""Alignment profiles: one subject's PAS alignment, saved and restored with orbax.

A profile is what it takes to steer a model towards one person: the kept heads,
their directions and sigmas, the chosen alpha, and the context (the subject's
few-shot system prompt). It records the model's fingerprint and the prompt
version, and loading it for another model is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from palign_jax import prompts
from palign_jax.errors import UserInputError

FORMAT_VERSION = 1


@dataclasses.dataclass
class AlignmentProfile:
  """A subject's alignment to one model."""

  subject_id: str
  model_fingerprint: str
  model_source: str
  prompt_version: str
  system_prompt: str
  alpha: float
  alpha_selection: str  # "kfold_known" (honest) or "oracle_test"
  known_answers: np.ndarray  # int[120]
  head_mask: np.ndarray  # bool[layers, heads]
  directions: np.ndarray  # f32[layers, heads, head_dim], unit length on kept heads
  sigma: np.ndarray  # f32[layers, heads]
  settings: dict = dataclasses.field(default_factory=dict)

  def steering(self, alpha: float | None = None) -> np.ndarray:
    """`f32[layers, heads, head_dim]`: alpha * sigma * direction on the kept heads."""
    alpha = self.alpha if alpha is None else alpha
    scale = alpha * self.sigma * self.head_mask
    return (scale[..., None] * self.directions).astype(np.float32)


def profile_from_alignment(alignment, *, model_fingerprint: str, model_source: str,
                           known_answers: np.ndarray, selection: str, decoding: str,
                           settings: dict) -> AlignmentProfile:
  """The profile of one `SubjectAlignment`, steering at the alpha `selection` chose for
  `decoding` (the context is the subject's few-shot prompt from all known answers)."""
  return AlignmentProfile(
      subject_id=alignment.subject_id, model_fingerprint=model_fingerprint,
      model_source=model_source, prompt_version=prompts.PROMPT_VERSION,
      system_prompt=prompts.few_shot_system_prompt(known_answers),
      alpha=alignment.chosen_alpha[selection][decoding], alpha_selection=selection,
      known_answers=np.asarray(known_answers), head_mask=alignment.head_mask,
      directions=alignment.directions, sigma=alignment.sigma,
      settings=dict(settings, decoding=decoding))


def save_profile(path: str | pathlib.Path, profile: AlignmentProfile) -> pathlib.Path:
  """Writes the profile as an orbax checkpoint directory (replacing an older one)."""
  path = pathlib.Path(path).absolute()
  arrays = {
      "known_answers": np.asarray(profile.known_answers, np.int32),
      "head_mask": np.asarray(profile.head_mask, np.int32),
      "directions": np.asarray(profile.directions, np.float32),
      "sigma": np.asarray(profile.sigma, np.float32),
  }
  meta = {k: v for k, v in dataclasses.asdict(profile).items() if k not in arrays}
  meta["format_version"] = FORMAT_VERSION
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
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
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta, arrays = dict(restored["meta"]), restored["arrays"]
  if meta.pop("format_version", None) != FORMAT_VERSION:
    raise UserInputError(f"{path}: profile format is not version {FORMAT_VERSION}")
  if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
    raise UserInputError(
        f"{path}: this profile was made for model {meta['model_source']} (fingerprint "
        f"{meta['model_fingerprint']}), not the loaded model (fingerprint {model_fingerprint}). "
        "Steering directions only mean something for the model they were found on: align "
        "the subject again with this model (python -m launch.align).")
  if prompt_version is not None and meta["prompt_version"] != prompt_version:
    raise UserInputError(f"{path}: profile uses prompt version {meta['prompt_version']!r}, "
                         f"this code uses {prompt_version!r}; align the subject again")
  return AlignmentProfile(
      known_answers=np.asarray(arrays["known_answers"]),
      head_mask=np.asarray(arrays["head_mask"]).astype(bool),
      directions=np.asarray(arrays["directions"]),
      sigma=np.asarray(arrays["sigma"]), **meta)
