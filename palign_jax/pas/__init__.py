"""The PAS algorithm, arrays in and arrays out: no prompts, no benchmark, no model.

* `labels`: a subject's answers label the shared activation vectors; train/validation splits.
* `probes`: one logistic probe per (subject, layer, head), all fitted in one jit.
* `heads`: how many heads to keep and which (ties broken by a seeded random order).
* `fit`: the whole per-subject fit (kept heads, directions, sigma) and steering tensors.

Usable on any model and any questionnaire: give it `[items, 2, layers, heads, head_dim]`
activations and `[subjects, items]` answers. The PAPI protocol (contexts, folds, alpha
selection) lives in `palign_jax.protocol`.
"""
