"""Evaluation: fidelity to the original model (fast), math accuracy, language retention."""
