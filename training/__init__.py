"""Time-split training, calibration, evaluation, MLflow tracking and Model Registry promotion."""
