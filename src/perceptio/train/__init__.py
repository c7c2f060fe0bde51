"""Training: the optimiser and schedule (this module grows into the training loop of issue 5)."""
