"""Scoring models on a split: sharded inference; merged, per-task and routing
accuracy; agreement with the teachers."""
