"""Evaluation: the PAPI metric, non-LLM baselines, evaluation methods and reports."""
