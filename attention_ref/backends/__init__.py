"""Built-in backends; each module imports its framework, so import them through the registry."""
