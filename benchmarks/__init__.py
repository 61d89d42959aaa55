"""What the methods are measured on (data, scenarios) and how (protocol, metrics, cost, store)."""
