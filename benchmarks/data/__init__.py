"""Data: datasets (real loaders, synthetic), transforms, class orders and task splits."""
