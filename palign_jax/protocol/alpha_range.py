"""The alpha grid that fits the model: measured once per model, on known items only.

The paper's alphas (0..8) were set for 8B models; scaling by sigma does not make them
portable, and a small model steered at alpha 8 stops answering with a letter at all. With
`config.pas.alpha_grid = "model_range"` the grid is measured instead:

1. PAS is fitted on the 120 known answers of a few reference PAPI subjects
   (`config.pas.range.subjects`; their held-out answers are never read);
2. their few-shot contexts are steered at each probe alpha (`config.pas.range.probe_alphas`)
   and a fixed, trait-stratified subset of the known items is scored;
3. `alpha_max` is the largest probe alpha up to which (every smaller one included) the letter
   mass stays admissible by the same rule as `selection` (mean and low quantile against
   alpha 0's, `config.selection`);
4. the grid is 0 and `alpha_max` times `config.pas.range.fractions`.

The measurement depends on the model and the settings alone, not on the subjects being
evaluated, so it is cached per model (JSON beside the activation cache) and recorded in every
PAS record (`work.alpha_range`). `"fixed"` uses `config.pas.alphas` as given (the paper's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from palign_jax import data, prompts
from palign_jax.errors import UserInputError
from palign_jax.pas import fit as pas_fit
from palign_jax.protocol import selection as selection_lib

GRIDS = ("model_range", "fixed")


@dataclasses.dataclass(frozen=True)
class RangeSettings:
  """`config.pas.range`."""

  subjects: str  # PAPI subjects whose known answers steer the probe contexts
  items_per_trait: int  # known items scored per trait
  probe_alphas: tuple[float, ...]  # increasing, > 0
  fractions: tuple[float, ...]  # of alpha_max, in (0, 1]

  @classmethod
  def from_config(cls, config) -> RangeSettings:
    r = config.pas.range
    settings = cls(subjects=str(r.subjects), items_per_trait=int(r.items_per_trait),
                   probe_alphas=tuple(float(a) for a in r.probe_alphas),
                   fractions=tuple(float(f) for f in r.fractions))
    if not settings.probe_alphas or list(settings.probe_alphas) != sorted(
        set(settings.probe_alphas)) or settings.probe_alphas[0] <= 0:
      raise UserInputError(f"config.pas.range.probe_alphas: {settings.probe_alphas} must be "
                           "increasing and positive")
    if not settings.fractions or not all(0 < f <= 1 for f in settings.fractions):
      raise UserInputError(f"config.pas.range.fractions: {settings.fractions} must be in (0, 1]")
    if not 1 <= settings.items_per_trait <= 24:
      raise UserInputError(f"config.pas.range.items_per_trait: {settings.items_per_trait} is "
                           "outside 1..24")
    return settings


def range_items(items_per_trait: int, seed: int) -> np.ndarray:
  """`int[5 * items_per_trait]`: known items (0-based), the first ones of each trait in a
  seeded order."""
  split, items = data.load_split(), data.load_items()
  rng = np.random.default_rng(seed)
  out = []
  for t in range(len(data.TRAITS)):
    members = split.known[items.trait[split.known] == t]
    out.extend(sorted(rng.permutation(members)[:items_per_trait]))
  return np.array(out, np.int64)


def grid_from_masses(probe_alphas, mass_mean, mass_low, selection: selection_lib.SelectionSettings,
                     fractions) -> tuple[float | None, tuple[float, ...], dict]:
  """`(alpha_max, grid, inadmissible)` from the masses at `(0,) + probe_alphas`."""
  why = selection_lib.admissible(np.asarray(mass_mean), np.asarray(mass_low), selection)
  alpha_max = None
  for k, alpha in enumerate(probe_alphas, start=1):
    if k in why:
      break
    alpha_max = float(alpha)
  grid = (0.0,) if alpha_max is None else tuple(
      sorted({0.0} | {round(alpha_max * f, 6) for f in fractions}))
  return alpha_max, grid, {str(probe_alphas[k - 1]): w for k, w in why.items()}


def _score_pairs(engine, contexts, items, steering, show_bar: bool) -> np.ndarray:
  """`engine.score` of every (context, alpha) pair, context-major, one prefix batch per call
  so that a bar (stderr) can follow the minutes this takes on a CPU."""
  pairs = np.stack(np.meshgrid(np.arange(len(contexts)), np.arange(steering.shape[1]),
                               indexing="ij"), -1).reshape(-1, 2)
  step = engine.prefix_batch(max(map(len, contexts)))
  out = []
  with tqdm(total=len(pairs), unit="context", desc="alpha range", file=sys.stderr,
            disable=not show_bar) as bar:
    for start in range(0, len(pairs), step):
      chunk = pairs[start:start + step]
      out.append(engine.score(contexts, items, steering=steering, pairs=chunk))
      bar.update(len(chunk))
  return np.concatenate(out)


def measure(engine, settings: RangeSettings, fit_settings: pas_fit.FitSettings,
            selection: selection_lib.SelectionSettings, seed: int,
            show_bar: bool = False) -> dict:
  """Measures the model's letter mass under steering (see the module docstring)."""
  start = time.perf_counter()
  reference = data.parse_subject_spec(settings.subjects, data.load_papi_subjects())
  known = data.known_answers(reference).astype(np.int32)
  fit = pas_fit.fit_pas(engine.activations(), known, fit_settings,
                        key=jax.random.PRNGKey(seed), subject_ids=np.arange(len(known)))
  alphas = np.array((0.0,) + settings.probe_alphas, np.float32)
  items = range_items(settings.items_per_trait, seed)
  contexts = [engine.context_tokens(prompts.few_shot_system_prompt(row)) for row in known]
  log_probs = _score_pairs(engine, contexts, items, pas_fit.steering_vectors(fit, alphas),
                           show_bar)
  by_alpha = np.swapaxes(log_probs.reshape(len(known), len(alphas), len(items), 5), 0, 1)
  by_alpha = by_alpha.reshape(len(alphas), -1, 5)  # [A, subjects x items]
  mass_mean, mass_low = selection_lib.mass_stats(by_alpha, selection.mass_quantile)
  alpha_max, grid, why = grid_from_masses(settings.probe_alphas, mass_mean, mass_low, selection,
                                          settings.fractions)
  return {"alpha_max": alpha_max, "alphas": list(grid),
          "probe_alphas": [float(a) for a in alphas],
          "letter_mass_mean": [float(m) for m in mass_mean],
          "letter_mass_low": [float(m) for m in mass_low],
          "inadmissible": why, "subjects": list(reference.ids), "items": len(items),
          "seconds": time.perf_counter() - start}


def resolve(engine, config, fit_settings: pas_fit.FitSettings,
            progress=None) -> tuple[tuple[float, ...], dict | None]:
  """The run's alphas and, for a model range, how they were measured (cached per model)."""
  grid = str(config.pas.alpha_grid)
  if grid not in GRIDS:
    raise UserInputError(f"config.pas.alpha_grid: {grid!r} is not one of {GRIDS}")
  if grid == "fixed":
    return tuple(sorted({float(a) for a in config.pas.alphas})), None
  settings = RangeSettings.from_config(config)
  selection = selection_lib.SelectionSettings.from_config(config)
  key = json.dumps([dataclasses.asdict(settings), dataclasses.asdict(selection),
                    fit_settings._asdict(), int(config.seed)], sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = (engine.cache_dir / "alpha_range"
          / f"{engine.fingerprint}-{prompts.PROMPT_VERSION}-{engine.params_dtype}-{digest}.json")
  if path.exists():
    record = dict(json.loads(path.read_text()), from_cache=True)
  else:
    if progress:
      progress(f"measuring the alpha range of the model: {len(settings.probe_alphas)} probe "
               f"alphas on the known items of subjects {settings.subjects} (once per model)")
    record = measure(engine, settings, fit_settings, selection, int(config.seed),
                     show_bar=progress is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{time.time_ns()}")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    record["from_cache"] = False
  return tuple(record["alphas"]), record
