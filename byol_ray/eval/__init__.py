"""Scoring a frozen or fine-tuned encoder: features, linear probes, kNN, the paper's linear,
semi-supervised and transfer protocols, and where an encoder to evaluate comes from."""
