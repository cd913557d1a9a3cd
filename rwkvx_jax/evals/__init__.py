"""Evaluations: passkey retrieval, long-context loss by position, and the lm-eval adapter."""
