"""Observability: Prometheus metrics, structured logs with request ids, and a redaction guard.

See docs/observability.md for the metric names, the log fields and the settings.
"""
