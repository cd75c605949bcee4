"""Run-time services every stage uses, knowing nothing of npp's data: the flag declarations and their types
(flags.py; `--help` is rendered from them in npp.app.help), the environment knobs (environment.py), devices,
ranks and loader workers (devices.py, ranks.py, workers.py), atomic file writes and hashes (files.py), and the
MLflow helpers and metric names (mlflow_utils.py, metric_names.py). It imports nothing of npp but its errors."""
