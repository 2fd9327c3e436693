"""Genie's serving and training services: gateway, Triton model services, workers, and their plugins."""
