"""Observability: Prometheus metrics, JSONL run events and per-request telemetry."""
