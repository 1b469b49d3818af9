"""The run configuration every launcher reads (`evaluate`, `align`, `chat`): the one place
where settings and their defaults live. The PAS values are the reference's.

    python -m launch.evaluate --config=configs/default.py --config.pas.top_k=48
    python -m launch.align --config=configs/default.py --config.pas.selection=oracle_test
"""

import ml_collections
from ml_collections import config_dict

from palign_jax.evaluation import methods


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "default"  # the embedded SmolLM2-135M-Instruct GGUF; or a .gguf / HF folder
  config.dtype = "float32"  # parameter dtype: float32 or bfloat16
  # The attention kernel: "auto" (cuDNN flash attention on a GPU in bfloat16/float16, einsums
  # elsewhere), "einsum", "xla" (jax.nn.dot_product_attention's XLA path) or "cudnn".
  config.attention = "auto"
  config.subjects = "0:8"  # 'all', ids, 0-based ranges, or an answers file (CSV/JSON)
  config.methods = ",".join(methods.LLM_METHODS + ("constant_3", "item_mean_loso", "ridge_cv"))
  config.seed = 0  # probe splits, head tie-breaking, folds, bootstrap
  config.subjects_per_batch = 8  # subjects aligned together (probe fits and sweeps)
  # launch.align: "pas" (steering profiles) or "dpo" (LoRA adapter profiles, config.dpo)
  config.align_method = "pas"

  config.pas = ml_collections.ConfigDict()
  config.pas.top_k = 24  # heads kept per subject, a count (the reference's value)
  # A share of all heads in (0, 1] instead; when set, it is used and top_k is ignored.
  config.pas.top_k_fraction = config_dict.placeholder(float)
  # The alpha grid (palign_jax/protocol/alpha_range.py). "model_range": measured once per
  # model on known items only: the largest probe alpha at which the steered model still
  # answers with a letter (config.selection's letter-mass rule), times config.pas.range
  # .fractions. The paper's alphas were set for 8B models; a 135M model stops answering with
  # a letter long before alpha 8. "fixed": config.pas.alphas as given (the paper's grid).
  config.pas.alpha_grid = "model_range"
  config.pas.alphas = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)  # the fixed grid; must include 0
  config.pas.range = ml_collections.ConfigDict()
  config.pas.range.subjects = "0:4"  # PAPI subjects whose known answers (only) steer the probes
  config.pas.range.items_per_trait = 2  # known items scored per trait and probe alpha
  config.pas.range.probe_alphas = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  config.pas.range.fractions = (0.25, 0.5, 0.75, 1.0)  # the grid: 0 and alpha_max x these
  config.pas.folds = 3  # k of the honest k-fold alpha selection over the 120 known items
  config.pas.selection = "kfold_known"  # launch.align: kfold_known (honest) or oracle_test
  # launch.align: the readout whose alpha a profile keeps: "chosen" (each subject's own, picked
  # with alpha on the known items) or a decoding name (see config.readout).
  config.pas.decoding = "chosen"

  config.probe = ml_collections.ConfigDict()
  config.probe.c = 1.0  # scikit-learn's C (inverse L2 strength), the reference's value
  config.probe.val_fraction = 0.4  # share of a subject's labelled items held out to rank heads
  config.probe.split_by = "pairs"  # "pairs": an item's A/E vectors stay on one side;
  #                                  "vectors": split single vectors, as the reference does
  config.probe.min_items = 2  # fewest labelled items (answers other than 3) to fit a subject
  config.probe.max_iter = 200  # L-BFGS iteration cap
  config.probe.tol = 1e-6  # stop when max|gradient| <= tol * C * n_train

  # The DPO baseline (palign_jax/protocol/dpo.py): one LoRA adapter per subject, trained on
  # preference pairs from the 120 known answers; the number of steps (and the learning rate,
  # if several are given) is chosen by k-fold over the known items (config.pas.folds folds).
  config.dpo = ml_collections.ConfigDict()
  config.dpo.beta = 0.1  # DPO temperature (Rafailov et al.'s usual value)
  config.dpo.rank = 8  # LoRA rank
  config.dpo.lora_alpha = 16.0  # LoRA scale = lora_alpha / rank (Hu et al.)
  config.dpo.targets = "q_proj,v_proj"  # attention projections adapted (any of q,k,v,o_proj)
  # Adam learning rate(s); more than one are searched with the steps, on the known items only.
  config.dpo.learning_rates = (5e-4,)
  config.dpo.max_steps = 64  # optimizer steps per adapter
  config.dpo.eval_every = 16  # candidate step counts: 0 (the base model), 16, 32, ..., max_steps
  config.dpo.pairs_per_step = 8  # preference pairs per step and adapter
  # Rejected option: "far_end" (the end of the scale away from the answer; a 3 gives no pair)
  # or "all_others" (the answer over each other option).
  config.dpo.rejected = "far_end"
  # Seed of the adapters' initialisation and the pair order (with each subject's id);
  # None: config.seed.
  config.dpo.seed = config_dict.placeholder(int)

  # Honest selection of PAS's alpha and DPO's steps on the known items
  # (palign_jax/protocol/selection.py). Fixed before any test result was looked at, for these
  # reasons: the readout renormalises over the five letters, so where the steered model puts
  # little mass on them its "answer" is noise. At alpha 0 the letter mass is ~0.99; a
  # candidate keeping under 90% of it on average, or whose 10% least letter-like items keep
  # under half of alpha 0's, has stopped answering the question as asked. And 120 known items
  # are a noisy judge (40 per fold): one standard error of slack toward "no change" is the
  # usual guard against picking noise (Hastie et al., The Elements of Statistical Learning,
  # 7.10).
  config.selection = ml_collections.ConfigDict()
  config.selection.min_mass_ratio = 0.9  # mean letter mass >= 0.9 x alpha 0's
  config.selection.mass_quantile = 0.1  # the low quantile of the per-item letter mass ...
  config.selection.min_low_mass_ratio = 0.5  # ... >= 0.5 x alpha 0's
  config.selection.se_rule = 1.0  # standard errors (over items) of slack toward no change

  config.readout = ml_collections.ConfigDict()
  # How answers are read from the letter distribution (palign_jax/readout.py), each a row.
  config.readout.decodings = "argmax,median,calibrated,calibrated_median,matched"
  # The headline few_shot and pas rows: "kfold" picks each subject's decoding (and alpha) on
  # the known items; or name one decoding to use it for everybody.
  config.readout.choice = "kfold"
  # Also the paper's own readout for few_shot and pas: greedy generation of up to 15 tokens,
  # the option parsed from the text as the reference does (palign_jax/generated.py); a row
  # `method [generated]`, with its agreement with the argmax letter and the unparsable count.
  # Off by default: it decodes token by token (benchmarks/RESULTS_generated.md).
  config.readout.generated = False

  config.scoring = ml_collections.ConfigDict()
  # Questions per compiled call; 10 divides every item count the protocol scores (180 held-out
  # items, 40 or 60 per fold, the 30 of the benchmark's fixed case), so no row is padding.
  config.scoring.question_batch = 10
  config.scoring.prefix_batch = 0  # (subject, alpha) contexts per call; 0 = sized to memory
  config.mesh = ml_collections.ConfigDict()
  # This process's devices as a data x model mesh (palign_jax/parallel.py): contexts and
  # subjects split over data, parameters over model (tensor parallel); -1 fills the devices.
  config.mesh.data = -1
  config.mesh.model = 1
  config.mesh.fsdp = False  # also split the parameters over data (FSDP), gathered per layer

  config.distributed = ml_collections.ConfigDict()
  # Several processes (hosts) share the subjects through jax.distributed. "auto" lets JAX find
  # the cluster (TPU pods, SLURM, Open MPI); else give the coordinator's host:port, the number
  # of processes and this one's id (0..n-1). One process needs none of it.
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.auto = False
  config.distributed.timeout_s = 300  # how long a process waits for the others to start
  # "independent": each process aligns its share of the subjects alone over its own devices
  # (a job array: one that dies stops no other). "pod": one SPMD program over every process's
  # devices (one global mesh: a multi-host TPU slice, or a model larger than one host); a
  # process that dies stops the job, and a restart resumes. See the README's "Scale out".
  config.distributed.mode = "independent"

  # The launchers' persistent XLA compilation cache (jax_compilation_cache_dir): a rerun with
  # the same shapes loads its compiled programs instead of compiling them again
  # (benchmarks/RESULTS_compile_cache.md). dir "": $JAX_COMPILATION_CACHE_DIR if set, else
  # $PALIGN_JAX_CACHE/xla (~/.cache/palign_jax/xla). Programs compiling faster than
  # min_compile_time_s are not kept (JAX's own default, 1 s, would skip most CPU programs).
  config.compile_cache = ml_collections.ConfigDict()
  config.compile_cache.enabled = True
  config.compile_cache.dir = ""
  config.compile_cache.min_compile_time_s = 0.1

  # launch.answer and api.answer: any questionnaire administered to many profiles at once
  # (palign_jax/questionnaire.py, palign_jax/administer.py).
  config.answer = ml_collections.ConfigDict()
  config.answer.questionnaire = ""  # CSV: item, statement[, trait, keyed]
  config.answer.profiles = ""  # a folder of profiles, a run folder, a glob or a list
  # A `key,value,label` CSV; "" = the questionnaire's own `# option:` lines, else PAPI's five.
  config.answer.scale = ""
  # "you": PAPI's "You <statement, lower-cased>." (for IPIP-style fragments such as "Talk a
  # lot."); "as_written": the statement as it is in the file.
  config.answer.statement_form = "you"
  # The readout of the trait scores in the summary and plot (all are in the CSV): "expected"
  # (the mean of the option distribution; a small model's argmax is nearly constant),
  # "median" or "argmax".
  config.answer.readout = "expected"
  config.answer.profiles_per_batch = 32  # profiles per scoring call and per resumable step

  # Open-ended generation (launch.chat, api.generate). Sampling with a mild repetition penalty
  # by default: greedy decoding of the embedded 135M model loops on long contexts.
  config.generation = ml_collections.ConfigDict()
  config.generation.max_new_tokens = 96
  config.generation.temperature = 0.7  # 0 = greedy
  config.generation.top_p = 0.9  # nucleus sampling (1 = off)
  config.generation.repetition_penalty = 1.2  # CTRL-style, on tokens already generated; 1 = off
  config.generation.no_repeat_ngram_size = 4  # never repeat a 4-gram of the reply; 0 = off
  config.generation.seed = 0

  config.plots = True
  return config
