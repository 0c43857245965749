"""Grafana dashboard for Herald (build.py writes herald.json)."""
