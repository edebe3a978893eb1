"""Evaluate a checkpoint layer by layer: the data, the scoring protocol and the scores."""
