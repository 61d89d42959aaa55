"""Reference points registered in the same registry as the methods."""
