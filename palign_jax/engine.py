"""The engine: a loaded model that speaks PAPI, with prompts turned into token ids once.

Joins loading, prompts and batched scoring. The protocol hands it token-id contexts (one per
subject, from `context_tokens`) and item indices; `score` returns option-letter
log-probabilities for every (context, alpha) pair, with the steering tensor kept on the device.
Every question turn begins with the same tokens (the chat template's user header and the
question's opening words); they are moved to the end of each context, so they are encoded once
per context rather than once per question: the token sequence, hence the result, is the same.
`activations()` gives PAS's shared head outputs, cached on disk with orbax per model
fingerprint and prompt version; `generate` answers open-ended prompts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from palign_jax import data, parallel, prompts, readout, scoring
from palign_jax.errors import UserInputError
from palign_jax.models import loading

ACTIVATION_LETTERS = ("A", "E")  # [:, 0] = answered "Very Accurate", [:, 1] = "Very Inaccurate"


def memory_budget(params_bytes: int) -> float | None:
  """Bytes a scoring batch may use on an accelerator: half its memory left after the
  parameters. None on a CPU, whose stats report no limit."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return None
  return max(0.5 * (limit - params_bytes), 2**28)


class Engine:
  """A model, its tokenizer and compiled scoring, addressed by token-id contexts and items."""

  def __init__(self, model: loading.LoadedModel, *, question_batch: int, prefix_batch: int,
               cache_dir: str | pathlib.Path | None = None, mesh: Mesh | None = None):
    """prefix_batch: (context, alpha) pairs per compiled call; 0 sizes it to memory. mesh: the
    `parallel` mesh the model's params were loaded onto (None: one device); batches are split
    over its `data` axis and the prefix batch rounded up to a multiple of it."""
    if question_batch < 1 or prefix_batch < 0:
      raise UserInputError(f"scoring.question_batch must be >= 1 and scoring.prefix_batch >= 0 "
                           f"(0 = sized to memory), got {question_batch} and {prefix_batch}")
    self.model = model
    self.mesh = mesh
    self.question_batch = question_batch
    self.requested_prefix_batch = prefix_batch
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir else loading.default_cache_dir()
    self.option_ids = prompts.option_token_ids(model.tokenizer)
    self._suffixes = self._all_question_suffixes()
    self.question_head = _common_prefix(self._suffixes)
    self._content_free = self._content_free_questions()
    self._questions: dict[tuple[int, ...], scoring.QuestionBatches] = {}
    self._activations: dict[str, np.ndarray] = {}
    self.activation_stats: dict = {}  # seconds to get the activations, and whether cached

  @classmethod
  def from_config(cls, config) -> Engine:
    """The engine a run config asks for (`model`, `dtype`, `attention`, `scoring.*`, `mesh.*`):
    the params are loaded straight into their shardings on the mesh (on one device, trivially).
    """
    mesh = parallel.mesh_from_config(config)
    fsdp = bool(config.mesh.fsdp)
    model = loading.load_model(
        config.model, dtype=config.dtype,
        shardings=lambda shapes: parallel.param_shardings(shapes, mesh, fsdp))
    attention = str(config.get("attention", "auto"))
    model = dataclasses.replace(model, config=dataclasses.replace(
        model.config, attention=attention).validate("--config.attention"))
    return cls(model, question_batch=int(config.scoring.question_batch),
               prefix_batch=int(config.scoring.prefix_batch), mesh=mesh)

  @property
  def data_shards(self) -> int:
    """How many ways a batch is split (the mesh's `data` axis; 1 without a mesh)."""
    return 1 if self.mesh is None else int(self.mesh.shape["data"])

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

  def _all_question_suffixes(self) -> list[list[int]]:
    # The suffix (user turn + answer prefill) does not depend on the system prompt.
    return [prompts.encode_question(self.model.tokenizer, prompts.DEFAULT_SYSTEM_PROMPT,
                                    text).suffix for text in data.load_items().text]

  def _content_free_questions(self) -> list[np.ndarray]:
    """The question turn with content-free statements ("N/A", "[MASK]", nothing), which
    measure the model's letter prior under a context (`readout`, contextual calibration)."""
    head, out = self.question_head, []
    for statement in readout.CONTENT_FREE_STATEMENTS:
      suffix = prompts.encode_question(self.model.tokenizer, prompts.DEFAULT_SYSTEM_PROMPT,
                                       statement).suffix
      if suffix[:len(head)] != head:
        raise UserInputError("tokenizer: a content-free question does not begin with the tokens "
                             "every question begins with; contextual calibration cannot share "
                             "the context")
      out.append(np.asarray(suffix[len(head):], np.int32))
    return out

  def context_tokens(self, system: str) -> np.ndarray:
    """`int32[n]`: the system turn followed by the tokens every question turn begins with."""
    return np.asarray(prompts.encode_system(self.model.tokenizer, system) + self.question_head,
                      np.int32)

  def question_tokens(self, items: np.ndarray) -> list[np.ndarray]:
    """The rest of each item's question turn, ending where the answer letter comes next."""
    head = len(self.question_head)
    return [np.asarray(self._suffixes[int(j)][head:], np.int32) for j in items]

  def questions(self, items: np.ndarray, content_free: bool = False) -> scoring.QuestionBatches:
    """The items' questions (then the content-free ones, if asked) as prebuilt batches."""
    key = (tuple(int(j) for j in items), content_free)
    if key not in self._questions:
      tokens = self.question_tokens(items) + (self._content_free if content_free else [])
      self._questions[key] = scoring.QuestionBatches.build(tokens, self.question_batch)
    return self._questions[key]

  def prefix_batch(self, context_length: int) -> int:
    """The configured prefix batch, or (0) the largest that fits an accelerator's memory;
    either way a multiple of the mesh's `data` axis, so every device gets whole contexts.

    On a CPU the automatic size is 1 per device: batching (subject, alpha) contexts only
    enlarges the attention temporaries past the caches, and `benchmarks/bench_pas.py` measured
    one context per call fastest there (a 6-context sweep: 200 s at 1, 244 s at 4 + 2).
    """
    shards = self.data_shards
    if self.requested_prefix_batch:
      return -(-self.requested_prefix_batch // shards) * shards
    params_bytes = sum(x.addressable_shards[0].data.nbytes if isinstance(x, jax.Array)
                       else x.nbytes for x in jax.tree.leaves(self.model.params))
    budget = memory_budget(params_bytes)
    if budget is None:
      return shards
    item_lengths = [len(s) - len(self.question_head) for s in self._suffixes]
    dtype_bytes = np.dtype(self.params_dtype).itemsize
    return shards * scoring.auto_prefix_batch(
        self.config, scoring.bucket_length(context_length), self.question_batch,
        scoring.bucket_length(max(item_lengths)), budget, dtype_bytes)

  def score(self, contexts: Sequence[np.ndarray], items: np.ndarray, *,
            steering: jax.Array | None = None, pairs: np.ndarray | None = None,
            content_free: bool = False, adapters: dict | None = None):
    """Option log-probabilities `f32[N, len(items), 5]` (letters A..E, full vocabulary).

    Args:
      contexts: token ids from `context_tokens`, one per subject (or system prompt).
      items: 0-based item indices asked after every context.
      steering: None or `f32[len(contexts), alphas, layers, heads, head_dim]` on the device.
      pairs: `int[N, 2]` (context, alpha) rows; default all of them (see `scoring`).
      content_free: also score the content-free questions in the same call (one more question
        batch) and return `(log_probs, prior)`, prior `f32[N, 5]` the letter prior of each row
        (`readout.content_free_prior`).
      adapters: None or per-context LoRA factors, every leaf `[len(contexts), layers, ...]`
        (`scoring.score_contexts`; e.g. `protocol.dpo` adapters).
    """
    out = scoring.score_contexts(
        self.model.params, self.model.config, contexts, self.questions(items, content_free),
        self.option_ids, steering=steering, pairs=pairs, question_batch=self.question_batch,
        prefix_batch=self.prefix_batch(max(map(len, contexts))), adapters=adapters,
        mesh=self.mesh)
    if not content_free:
      return out
    return out[:, :len(items)], readout.content_free_prior(out[:, len(items):])

  def score_systems(self, systems: Sequence[str], items: np.ndarray, *,
                    content_free: bool = False):
    """Unsteered option log-probabilities `f32[len(systems), len(items), 5]` (and the
    content-free prior `[len(systems), 5]` when asked)."""
    return self.score([self.context_tokens(s) for s in systems], items,
                      content_free=content_free)

  def _activations_path(self, which: str = "known") -> pathlib.Path:
    name = f"{self.fingerprint}-{prompts.PROMPT_VERSION}-{self.params_dtype}"
    return self.cache_dir / "activations" / (name if which == "known" else f"{name}-{which}")

  def activations(self, which: str = "known") -> np.ndarray:
    """`f32[items, 2, layers, heads, head_dim]`: head outputs at the answer letter A / E.

    which: "known" (the 120 known items, PAS's shared activations) or "heldout" (the 180 test
    items, for the `pas_probes` diagnostic; no answer is read). One run per model, shared by
    all subjects; cached on disk.
    """
    if which not in ("known", "heldout"):
      raise ValueError(f"activations: {which!r} is not 'known' or 'heldout'")
    if which not in self._activations:
      start = time.perf_counter()
      path = self._activations_path(which)
      exists = parallel.pod_agrees(path.exists())  # a pod's processes all read, or all compute
      cached = load_activations(path, self.fingerprint) if exists else None
      stats = {"from_cache": cached is not None}
      if cached is None:
        cached = self._compute_activations(which)
        if parallel.writes_host_caches():
          save_activations(path, cached, self.fingerprint)
      self._activations[which] = cached
      stats["seconds"] = time.perf_counter() - start
      if which == "known":
        self.activation_stats.update(stats)
      else:
        self.activation_stats["heldout"] = stats
    return self._activations[which]

  def _compute_activations(self, which: str = "known") -> np.ndarray:
    split, items = data.load_split(), data.load_items()
    indices = split.known if which == "known" else split.heldout
    sequences = [prompts.encode_activation_prompt(self.model.tokenizer, items.text[j], letter)
                 for j in indices for letter in ACTIVATION_LETTERS]
    heads = scoring.capture_head_outputs(self.model.params, self.model.config, sequences,
                                         batch_size=16 * self.data_shards, mesh=self.mesh)
    heads = np.asarray(heads, np.float32)
    return heads.reshape((len(indices), len(ACTIVATION_LETTERS)) + heads.shape[1:])

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
  """Writes the shared activations and what made them (orbax), through a private folder
  renamed into place: processes sharing a cache may race to write the same entry, and the
  first one's (identical) copy stands."""
  path = path.absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
  try:
    with loading.host_checkpointer() as checkpointer:
      checkpointer.save(tmp / "entry", ocp.args.Composite(
          arrays=ocp.args.StandardSave({"activations": activations}),
          meta=ocp.args.JsonSave({"fingerprint": fingerprint,
                                  "prompt_version": prompts.PROMPT_VERSION,
                                  "shape": list(activations.shape)})))
    try:
      os.rename(tmp / "entry", path)
    except OSError:
      if not path.exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_activations(path: pathlib.Path, fingerprint: str) -> np.ndarray:
  """Reads cached activations; refuses a cache made by another model or prompt version."""
  with loading.host_checkpointer() as checkpointer:
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


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
  """The longest token prefix shared by every sequence, leaving each at least one token."""
  head = list(os.path.commonprefix([list(s) for s in sequences]))
  return head[:min(len(s) for s in sequences) - 1]
