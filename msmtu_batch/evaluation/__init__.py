"""Evaluation: baselines, reports and the ablation (the metrics themselves are
:mod:`msmtu_batch.model.metrics`, as training scores with them too)."""
