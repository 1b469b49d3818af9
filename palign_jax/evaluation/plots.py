"""Plots (PNG, matplotlib): error by method and trait, and Big Five profiles."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from palign_jax import data  # noqa: E402
from palign_jax.evaluation.metrics import Summary  # noqa: E402


def trait_scores(answers: np.ndarray, item_indices: np.ndarray) -> np.ndarray:
  """Big Five trait scores (1..5, reverse-keyed items scored 6 - answer), `[..., 5]`.

  Args:
    answers: `[..., len(item_indices)]` answers 1..5 (0 = missing, skipped).
    item_indices: 0-based item indices the answers belong to.
  """
  items = data.load_items()
  answers = np.asarray(answers, np.float64)
  keyed = np.where(items.keyed[item_indices] > 0, answers, 6 - answers)
  valid = answers > 0
  traits = items.trait[item_indices]
  scores = []
  for t in range(len(data.TRAITS)):
    mask = valid & (traits == t)
    with np.errstate(invalid="ignore", divide="ignore"):
      scores.append(np.where(mask, keyed, 0).sum(-1) / mask.sum(-1))
  return np.stack(scores, axis=-1)


def plot_errors(summaries: dict[str, Summary], path: str | pathlib.Path, title: str = "") -> None:
  """Grouped bars: mean absolute error per trait for each method, with 95% CI whiskers."""
  methods = list(summaries)
  traits = list(data.TRAITS)
  width = 0.8 / max(len(methods), 1)
  fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(traits) * len(methods) * 0.35 + 4), 4.5))
  x = np.arange(len(traits))
  for k, method in enumerate(methods):
    s = summaries[method]
    mean = np.array([s.mean[t] for t in traits])
    low = mean - np.array([s.ci_low[t] for t in traits])
    high = np.array([s.ci_high[t] for t in traits]) - mean
    ax.bar(x + (k - (len(methods) - 1) / 2) * width, mean, width, yerr=[low, high],
           capsize=2, label=f"{method} (sum {s.mean['sum']:.2f})")
  ax.set_xticks(x, [f"{t}\n{data.TRAIT_NAMES[t]}" for t in traits])
  ax.set_ylabel("mean |predicted - actual| (lower is better)")
  ax.set_title(title or "PAPI held-out error by trait (95% bootstrap CI over subjects)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_profile(subject_id: str, profiles: dict[str, np.ndarray],
                 path: str | pathlib.Path) -> None:
  """Big Five profile of one subject: the person and each method's answers, `{name: [5]}`."""
  traits = list(data.TRAITS)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  x = np.arange(len(traits))
  for name, scores in profiles.items():
    style = dict(linewidth=3, color="black") if name == "person" else dict(linewidth=1.5)
    ax.plot(x, scores, marker="o", label=name, **style)
  ax.set_xticks(x, [data.TRAIT_NAMES[t] for t in traits])
  ax.set_ylim(1, 5)
  ax.set_ylabel("trait score on held-out items (1..5)")
  ax.set_title(f"Big Five profile of subject {subject_id}: person vs models")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
