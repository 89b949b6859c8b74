"""Evaluation: metrics, baselines, reports and the ablation."""
