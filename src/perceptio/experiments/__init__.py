"""Controlled experiments on the synthetic world."""
