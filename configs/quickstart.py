"""The README's main command: every method on one PAPI subject, sized for a 2-core CPU.

Same methods and prompts as configs/default.py; one subject, a two-value alpha grid and
two folds, so that it finishes in minutes on a laptop-class CPU. Use configs/default.py
(or --subjects and --config.pas.alphas) for real evaluations.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.subjects = "0:1"
  config.subjects_per_batch = 1
  config.pas.alphas = (0.0, 4.0)
  config.pas.folds = 2
  return config
