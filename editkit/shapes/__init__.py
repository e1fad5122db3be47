"""The shapes world in the library: its palette, its deterministic detector and the verifier built on it."""
