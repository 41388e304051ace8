"""Continued pretraining: data windows, the training loop, optimizer and schedule, evaluation, metrics,
checkpoints that resume bit-exactly, and data parallel under torchrun."""
