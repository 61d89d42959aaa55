"""What the methods are measured on and how, in the order a batch travels (README "Layout"):
config.py (the run config), data/ (datasets, scenarios), cost/ (counting), run/ (protocol, runner,
store, sweeps), metrics.py and diagnostics.py (results), tables/ (cost table, paper tables),
tools/ (parity, speed, feature probe, GPU check)."""
