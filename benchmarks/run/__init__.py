"""Running: the train/evaluate protocol, runner, run store, sweeps, DDP, timed steps and throughput, CLI helpers."""
