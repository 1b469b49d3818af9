"""The README's main command: every method on one PAPI subject, sized for a 2-core CPU.

Same methods and prompts as configs/default.py; one subject, a three-value alpha grid
(measured on two reference subjects' known items) and two folds, so that it finishes in
minutes on a laptop-class CPU. Use configs/default.py (or --subjects and --config.pas.alphas)
for real evaluations.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.subjects = "0:1"
  config.subjects_per_batch = 1
  config.pas.alphas = (0.0, 4.0)  # the fixed grid, if --config.pas.alpha_grid=fixed
  config.pas.range.subjects = "0:2"
  config.pas.range.fractions = (0.5, 1.0)  # alphas 0, alpha_max / 2, alpha_max
  config.pas.folds = 2
  return config
