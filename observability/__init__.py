"""Observability: Prometheus metrics for web and workers, the InfluxDB writer, structured logs."""
