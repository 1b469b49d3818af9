"""The PAPI protocol around PAS: what the benchmark defines and how PAS is run under it.

* `metric`: the per-trait mean absolute error on held-out items.
* `alignment`: few-shot contexts, folds, the honest k-fold alpha selection and the labelled
  oracle, returning one typed `SubjectAlignment` per subject.
* `records`: result records (one per subject and method) built from alignments and predictions.
* `profile`: a subject's alignment saved with orbax, for `launch.chat`.
"""
