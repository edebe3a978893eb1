"""Calibration: statistics of a model's activations (and gradients) on data, gathered through the
layer stream and stored per layer, for the data-aware merge methods."""
