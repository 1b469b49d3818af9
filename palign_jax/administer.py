"""Administering a questionnaire to many profiles at once: one scoring call for all of them.

Owns how a list of alignment profiles (PAS and DPO mixed) becomes one batch for
`scoring.score_contexts`: each profile's context (its system prompt, then the tokens every
question turn begins with) is encoded once under its steering and adapter, and every item is
scored against it. PAS rows carry zero adapters and DPO rows zero steering: both side paths
then add exactly zero, so a row computes what it computes alone (tested). Adapters of different
targets or ranks are padded to their union with zeros.

Shapes: steering `[profiles, 1, layers, heads, head_dim]`, adapters `{target: {"a": [profiles,
layers, in, rank], "b": [profiles, layers, rank, out]}}`, option log-probabilities
`[profiles, items, options]`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from palign_jax import prompts, scoring
from palign_jax import questionnaire as questionnaire_lib
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import adapter_dims
from palign_jax.protocol.profile import AlignmentProfile


def stack_steering(profiles: Sequence[AlignmentProfile], config: ModelConfig
                   ) -> np.ndarray | None:
  """`f32[profiles, 1, layers, heads, head_dim]` at each profile's alpha (zeros for a profile
  without steering); None when no profile steers."""
  if not any(p.has_steering for p in profiles):
    return None
  zero = np.zeros((config.num_layers, config.num_heads, config.head_dim), np.float32)
  return np.stack([zero if p.steering() is None else p.steering() for p in profiles])[:, None]


def stack_adapters(profiles: Sequence[AlignmentProfile], config: ModelConfig) -> dict | None:
  """LoRA factors with a leading `[profiles]` axis over the union of the profiles' targets,
  each rank zero-padded to the largest (zero rows and columns add nothing); a profile without
  an adapter gets zeros. None when no profile has one."""
  targets = sorted({t for p in profiles if p.adapters for t in p.adapters})
  if not targets:
    return None
  out = {}
  for target in targets:
    rank = max(p.adapters[target]["a"].shape[-1] for p in profiles
               if p.adapters and target in p.adapters)
    d_in, d_out = adapter_dims(config, target)
    a = np.zeros((len(profiles), config.num_layers, d_in, rank), np.float32)
    b = np.zeros((len(profiles), config.num_layers, rank, d_out), np.float32)
    for i, p in enumerate(profiles):
      if p.adapters and target in p.adapters:
        r = p.adapters[target]["a"].shape[-1]
        a[i, ..., :r] = p.adapters[target]["a"]
        b[i, :, :r] = p.adapters[target]["b"]
    out[target] = {"a": a, "b": b}
  return out


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A questionnaire turned into tokens for one tokenizer: what every profile's batch shares."""

  head: list[int]  # tokens every question turn begins with (moved to the end of each context)
  questions: list[np.ndarray]  # the rest of each item's question turn, `[items]` ragged
  option_ids: np.ndarray  # int[options]


def prepare(tokenizer, questionnaire: questionnaire_lib.Questionnaire,
            statement_form: str = "you") -> Prepared:
  """Question tokens of every item (PAPI's chat layout: the answer key is the next token)."""
  option_ids = questionnaire_lib.option_token_ids(tokenizer, questionnaire.scale)
  suffixes = [prompts.encode_conversation(
      tokenizer, prompts.DEFAULT_SYSTEM_PROMPT,
      questionnaire_lib.question_text(s, questionnaire.scale, statement_form),
      prompts.ANSWER_PREFILL).suffix for s in questionnaire.statements]
  head = list(os.path.commonprefix(suffixes))[:min(map(len, suffixes)) - 1]
  return Prepared(head, [np.asarray(s[len(head):], np.int32) for s in suffixes], option_ids)


def context_tokens(tokenizer, prepared: Prepared, profile: AlignmentProfile) -> np.ndarray:
  """`int32[n]`: the profile's system turn followed by the shared question head."""
  return np.asarray(prompts.encode_system(tokenizer, profile.system_prompt) + prepared.head,
                    np.int32)


def score(engine, profiles: Sequence[AlignmentProfile], prepared: Prepared, *,
          prefix_batch: int | None = None) -> np.ndarray:
  """Option log-probabilities `f32[profiles, items, options]` of every (profile, item) pair,
  in one `score_contexts` call: contexts encoded once each, batches of `prefix_batch` profiles
  (default the engine's, sized to memory) split over the mesh's data axis."""
  tokenizer = engine.model.tokenizer
  contexts = [context_tokens(tokenizer, prepared, p) for p in profiles]
  steering = stack_steering(profiles, engine.config)
  if steering is not None:
    import jax.numpy as jnp
    steering = jnp.asarray(steering)
  batch = prefix_batch or engine.prefix_batch(max(map(len, contexts)))
  return scoring.score_contexts(
      engine.model.params, engine.config, contexts, prepared.questions, prepared.option_ids,
      steering=steering, adapters=stack_adapters(profiles, engine.config),
      question_batch=engine.question_batch, prefix_batch=batch, mesh=engine.mesh)
