"""Pieces of the training loop that are not the loop: sample order, seeds, numeric precision."""
