"""Default evaluation config: every method, the reference's PAS settings.

    python -m launch.evaluate --config=configs/default.py --config.pas.top_k=48
"""

import ml_collections

from palign_jax.evaluation import methods


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the embedded SmolLM2-135M-Instruct GGUF; or a .gguf / HF folder
  config.dtype = "float32"  # parameter dtype: float32 or bfloat16
  config.subjects = "0:8"  # 'all', ids, 0-based ranges, or an answers file (CSV/JSON)
  config.methods = ",".join(methods.LLM_METHODS + ("constant_3", "item_mean_loso", "ridge_cv"))
  config.seed = 0
  config.subjects_per_batch = 4  # subjects aligned together in one compiled sweep
  config.pas = ml_collections.ConfigDict()
  config.pas.top_k = 24.0  # heads kept: a count, or a fraction of all heads when < 1
  config.pas.alphas = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
  config.pas.folds = 3  # honest alpha selection: k-fold over the 120 known items
  config.scoring = ml_collections.ConfigDict()
  config.scoring.question_batch = 20  # 20 divides the 180 held-out items and 40-item folds
  config.plots = True
  return config
