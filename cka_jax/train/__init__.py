"""Training: methods as weighted loss terms, the one train step, and the loop."""
