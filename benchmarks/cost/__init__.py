"""Cost counting on the method object: parameters, stored state, MACs of every pass (exact and paper convention)."""
