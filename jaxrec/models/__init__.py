"""Flax surrogate recommenders, each exposed as pure ``loss`` / ``per_sample_loss`` functions."""
