"""Registered versions as MLflow pyfunc generators: log, add samplers, load, predict."""
