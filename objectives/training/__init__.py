"""What every family trains with: the `Objective` base and its tiers, the chunked cross-entropy, the metric names,
the optimizer and schedule, staged training, checkpoints and warm starts, and the training callbacks."""
