"""Model definitions (Llama family), weight loaders and the named-model registry."""
