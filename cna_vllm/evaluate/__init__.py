"""Evaluation: refusal judge, quality metrics, MMLU, statistics, A/B runs and reports."""
