"""The local stack: services (SeaweedFS, MLflow, Ray head), their lifecycle, and the Ray connection."""
