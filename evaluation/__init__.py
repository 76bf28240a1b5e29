"""Offline evaluation: ranking metrics, off-policy estimators, A/B comparison, plots."""
