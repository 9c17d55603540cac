"""The search platform: Ray Train per trial, Ray Tune + Optuna, MLflow tracking (entry: tune/search.py)."""
