"""The training stage: data loading and splits, negative samplers, losses, the training job and
offline evaluation. Depends on ``towers`` only."""
