"""Observing a storage system: the event log and the Prometheus metrics."""
