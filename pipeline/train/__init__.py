"""What every training stage shares: the runtime (device, precision, ranks, seeds), the
epoch loop, checkpoints, evaluation passes, and the one stage skeleton."""
