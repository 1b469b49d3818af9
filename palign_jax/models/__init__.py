"""Llama-family models: config, parameter layout, forward pass, loading."""
