"""DPO with LoRA adapters, arrays in and arrays out: no prompts, no benchmark, no PAPI.

* `lora`: adapters for the attention projections (init, scale, the form `llama.forward` takes).
* `train`: completion log-probabilities, the DPO loss, and many adapters trained at once (one
  compiled step vmapped over rows that share the frozen base weights), with snapshots at
  candidate step counts and a per-row stop on a non-finite loss.

Give it token tables of prompts and completions and each row's preference pairs. The PAPI
protocol (pairs from a subject's answers, folds, the honest choice of the number of steps)
lives in `palign_jax.protocol.dpo`.
"""
