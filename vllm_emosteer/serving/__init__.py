"""Serving: the HTTP endpoint, Prometheus metrics, the serve command."""
