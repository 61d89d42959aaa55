"""Tools beside the runs: parity and speed against the authors' code, feature probe, GPU check."""
