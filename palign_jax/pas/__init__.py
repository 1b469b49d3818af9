"""Personality Activation Search: labels, probes, directions, steering, alpha search."""
