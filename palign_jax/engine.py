"""The engine: a loaded model that speaks PAPI (system prompts and item numbers).

Joins loading, prompts and batched scoring so the methods and launchers never
handle token ids: `score(systems, items, steering)` gives option-letter
log-probabilities for every (system prompt, item) pair, encoding each system
prompt once (prefix sharing); `activations()` gives PAS's shared head outputs,
cached on disk with orbax per model fingerprint and prompt version;
`generate` answers open-ended prompts.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import orbax.checkpoint as ocp

from palign_jax import data, prompts, scoring
from palign_jax.errors import UserInputError
from palign_jax.models import loading

ACTIVATION_LETTERS = ("A", "E")  # [:, 0] = answered "Very Accurate", [:, 1] = "Very Inaccurate"


class Engine:
  """A model, its tokenizer and compiled scoring, addressed by prompts and item indices."""

  def __init__(self, model: loading.LoadedModel, *, question_batch: int = 64,
               cache_dir: str | pathlib.Path | None = None):
    self.model = model
    self.question_batch = question_batch
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir else loading.default_cache_dir()
    self.option_ids = prompts.option_token_ids(model.tokenizer)
    self._suffixes: dict[int, list[int]] = {}
    self._activations: np.ndarray | None = None

  @classmethod
  def load(cls, spec: str | None, *, dtype: str = "float32", question_batch: int = 64) -> Engine:
    return cls(loading.load_model(spec, dtype=dtype), question_batch=question_batch)

  @property
  def fingerprint(self) -> str:
    return self.model.fingerprint

  @property
  def source(self) -> str:
    return self.model.source

  @property
  def params_dtype(self) -> str:
    return str(self.model.params["embed_tokens"]["embedding"].dtype)

  @property
  def config(self):
    return self.model.config

  def _question_suffixes(self, items: np.ndarray) -> list[list[int]]:
    texts = data.load_items().text
    for j in items:
      j = int(j)
      if j not in self._suffixes:
        # The suffix (user turn + answer prefill) does not depend on the system prompt.
        self._suffixes[j] = prompts.encode_question(
            self.model.tokenizer, prompts.DEFAULT_SYSTEM_PROMPT, texts[j]).suffix
    return [self._suffixes[int(j)] for j in items]

  def score(self, systems: Sequence[str], items: np.ndarray,
            steering: np.ndarray | None = None) -> np.ndarray:
    """Option log-probabilities `f32[len(systems), len(items), 5]` (A..E).

    Args:
      systems: one system prompt per row (each encoded once as a shared prefix).
      items: 0-based item indices asked after every system prompt.
      steering: None or `f32[len(systems), layers, heads, head_dim]`, one per row.
    """
    prefixes = [prompts.encode_system(self.model.tokenizer, s) for s in systems]
    return scoring.score_prefix_shared(
        self.model.params, self.model.config, prefixes, self._question_suffixes(items),
        self.option_ids, steering=steering, question_batch=self.question_batch)

  def _activations_path(self) -> pathlib.Path:
    return (self.cache_dir / "activations"
            / f"{self.fingerprint}-{prompts.PROMPT_VERSION}-{self.params_dtype}")

  def activations(self) -> np.ndarray:
    """`f32[120, 2, layers, heads, head_dim]`: head outputs at the answer letter A / E.

    One run per model over the 120 known items, shared by all subjects; cached on disk.
    """
    if self._activations is None:
      path = self._activations_path()
      cached = load_activations(path, self.fingerprint) if path.exists() else None
      if cached is None:
        cached = self._compute_activations()
        save_activations(path, cached, self.fingerprint)
      self._activations = cached
    return self._activations

  def _compute_activations(self) -> np.ndarray:
    split, items = data.load_split(), data.load_items()
    sequences = [prompts.encode_activation_prompt(self.model.tokenizer, items.text[j], letter)
                 for j in split.known for letter in ACTIVATION_LETTERS]
    heads = scoring.capture_head_outputs(self.model.params, self.model.config, sequences)
    heads = np.asarray(heads, np.float32)
    return heads.reshape((len(split.known), len(ACTIVATION_LETTERS)) + heads.shape[1:])

  def generate(self, system: str, user: str, steering: np.ndarray | None = None, *,
               max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0) -> str:
    """A reply to `user` under `system`, greedy (or sampled), optionally steered."""
    tokenizer = self.model.tokenizer
    tokens = prompts.encode_chat_prompt(tokenizer, system, user)
    eos = [i for i in {tokenizer.eos_token_id} if i is not None]
    out = scoring.generate(self.model.params, self.model.config, [tokens], max_new_tokens,
                           steering=steering, temperature=temperature, seed=seed, eos_ids=eos)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def save_activations(path: pathlib.Path, activations: np.ndarray, fingerprint: str) -> None:
  """Writes the shared activations and what made them (orbax)."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path.absolute(), ocp.args.Composite(
        arrays=ocp.args.StandardSave({"activations": activations}),
        meta=ocp.args.JsonSave({"fingerprint": fingerprint,
                                "prompt_version": prompts.PROMPT_VERSION,
                                "shape": list(activations.shape)})), force=True)


def load_activations(path: pathlib.Path, fingerprint: str) -> np.ndarray:
  """Reads cached activations; refuses a cache made by another model or prompt version."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path.absolute(), ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta = restored["meta"]
  if meta.get("fingerprint") != fingerprint or meta.get("prompt_version") != prompts.PROMPT_VERSION:
    raise UserInputError(
        f"{path}: activation cache was made with model {meta.get('fingerprint')} and prompt "
        f"version {meta.get('prompt_version')!r}, not {fingerprint} / "
        f"{prompts.PROMPT_VERSION!r}; delete it to recompute")
  activations = np.asarray(restored["arrays"]["activations"], np.float32)
  if not np.isfinite(activations).all():
    raise UserInputError(f"{path}: activation cache holds NaN or inf; delete it to recompute")
  return activations
