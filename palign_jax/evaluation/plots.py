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


FLOOR_METHODS = ("constant_3", "item_mean_loso", "ridge_cv")  # drawn as reference lines


def _kind(method: str) -> str:
  base = method.split(" ")[0]
  if base.startswith("constant_") or base in ("item_mean_loso", "ridge_cv"):
    return "baseline"
  return "oracle" if "oracle" in base else "model"


_COLOURS = {"model": "#3a6ea5", "oracle": "#d08c2e", "baseline": "#8a8a8a"}


def plot_errors(summaries: dict[str, Summary], path: str | pathlib.Path, title: str = "") -> None:
  """Composite error per method (sorted, 95% CI, floors marked) beside a per-trait heatmap.

  Made for 5-15 methods and a laptop screen: 1,200 x (220 + 30 per method) px at 100%.
  Left: the sum of the five trait errors per method, best at the top, with its bootstrap CI;
  model rows blue, the test-selected (oracle) rows orange, non-LLM baselines grey; the
  always-3, item-mean and ridge floors are dashed vertical lines. Right: each method's
  error per trait, in the same row order, with the value written in each cell.
  """
  methods = sorted(summaries, key=lambda m: summaries[m].mean["sum"])
  traits = list(data.TRAITS)
  rows = len(methods)
  fig = plt.figure(figsize=(12, 2.2 + 0.3 * rows), dpi=100)
  grid = fig.add_gridspec(1, 2, width_ratios=[1.35, 1], wspace=0.05)
  ax_sum, ax_heat = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
  y = np.arange(rows)
  means = np.array([summaries[m].mean["sum"] for m in methods])
  low = means - np.array([summaries[m].ci_low["sum"] for m in methods])
  high = np.array([summaries[m].ci_high["sum"] for m in methods]) - means
  colours = [_COLOURS[_kind(m)] for m in methods]
  ax_sum.barh(y, means, xerr=[low, high], color=colours, height=0.7, capsize=2,
              error_kw={"elinewidth": 1, "ecolor": "#333333"})
  for k in range(rows):
    ax_sum.text(0.04, k, f"{means[k]:.2f}", va="center", fontsize=9, color="white")
  for floor, style in zip(FLOOR_METHODS, ("--", ":", "-."), strict=True):
    if floor in summaries:
      ax_sum.axvline(summaries[floor].mean["sum"], color="#444444", linestyle=style,
                     linewidth=1, label=f"{floor} ({summaries[floor].mean['sum']:.2f})")
  ax_sum.set_yticks(y, methods, fontsize=10)
  ax_sum.set_ylim(rows - 0.5, -0.5)  # best at the top; rows line up with the heatmap's
  ax_sum.set_xlim(0, float(np.nanmax(means + high)) * 1.15)
  ax_sum.set_xlabel("sum of the five trait errors, with its 95% bootstrap CI", fontsize=10)
  handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
  labels = ["model (honest)", "oracle (alpha chosen on the test items)", "non-LLM baseline"]
  floor_handles, floor_labels = ax_sum.get_legend_handles_labels()
  ax_sum.legend(handles + floor_handles, labels + floor_labels, fontsize=8, ncol=3,
                loc="upper center", bbox_to_anchor=(0.5, -0.55 / rows - 0.07), frameon=False)

  table = np.array([[summaries[m].mean[t] for t in traits] for m in methods])
  ax_heat.imshow(table, cmap="viridis_r", aspect="auto")
  ax_heat.set_xticks(np.arange(len(traits)), traits, fontsize=10, fontweight="bold")
  ax_heat.xaxis.tick_top()
  names = [f"{t} {data.TRAIT_NAMES[t].lower()}" for t in traits]
  ax_heat.set_xlabel(", ".join(names[:3]) + ",\n" + ", ".join(names[3:]), fontsize=9)
  ax_heat.set_title("error per trait, mean |predicted - actual|", fontsize=11)
  ax_heat.set_yticks(y, [])
  threshold = np.nanmean(table)
  for (k, t), value in np.ndenumerate(table):
    ax_heat.text(t, k, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center",
                 va="center", fontsize=9, color="white" if value > threshold else "black")
  n = max(s.n_subjects for s in summaries.values())
  ax_sum.set_title(title or f"PAPI held-out error (lower is better), {n} subject"
                   f"{'s' * (n != 1)}", fontsize=11)
  height = fig.get_figheight()
  fig.subplots_adjust(left=0.19, right=0.98, top=1 - 0.75 / height, bottom=1.0 / height)
  fig.savefig(path)
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


def plot_verdicts(verdicts, path: str | pathlib.Path, title: str = "") -> None:
  """Paired verdicts (`metrics.Paired`): per-subject change of the composite error of each
  row against its reference (dots), the mean with its paired bootstrap 95% CI (black), and
  zero (no change). Left of zero: the row is closer to the person."""
  rows = len(verdicts)
  fig, ax = plt.subplots(figsize=(10, 1.6 + 0.45 * rows), dpi=100)
  rng = np.random.default_rng(0)  # jitter only
  for k, v in enumerate(verdicts):
    diffs = np.asarray(v.differences, np.float64)
    colours = np.where(diffs < -1e-9, "#2e8b57", np.where(diffs > 1e-9, "#c0392b", "#888888"))
    ax.scatter(diffs, k + rng.uniform(-0.18, 0.18, len(diffs)), s=14, c=colours, alpha=0.7,
               linewidths=0)
    ax.errorbar(v.mean, k, xerr=[[v.mean - v.ci_low], [v.ci_high - v.mean]], fmt="o",
                color="black", capsize=3, markersize=5)
    ax.text(1.01, k, f"{v.wins} better / {v.ties} tied / {v.losses} worse",
            transform=ax.get_yaxis_transform(), va="center", fontsize=8)
  ax.axvline(0, color="#444444", linewidth=1, linestyle="--")
  ax.set_yticks(np.arange(rows), [f"{v.row}  vs  {v.reference}" for v in verdicts], fontsize=9)
  ax.set_ylim(rows - 0.5, -0.5)
  ax.set_xlabel("per-subject change in composite error (row - reference); left of 0 = closer "
                "to the person", fontsize=9)
  n = max((v.n_subjects for v in verdicts), default=0)
  ax.set_title(title or f"Paired verdicts, {n} subject{'s' * (n != 1)}: a dot per subject "
               "(green better, red worse, grey tied), black = mean with 95% CI", fontsize=10)
  fig.subplots_adjust(left=0.34, right=0.8, top=1 - 0.5 / fig.get_figheight(),
                      bottom=0.9 / fig.get_figheight())
  fig.savefig(path)
  plt.close(fig)
