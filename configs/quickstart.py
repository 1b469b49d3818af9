"""The README's main command: every method on two PAPI subjects, sized for a 2-core CPU.

Same methods and prompts as configs/default.py; fewer subjects and a smaller alpha grid
and fold count so that it finishes in minutes on a laptop-class CPU.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.subjects = "0:2"
  config.subjects_per_batch = 2
  config.pas.alphas = (0.0, 2.0, 4.0, 8.0)
  config.pas.folds = 2
  return config
