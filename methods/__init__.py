"""What is compared: the shared prompted ViT, the registry and one file per method."""
