"""Shapes world: a procedural image world, a deterministic detector and a tiny SD model trained on it."""
