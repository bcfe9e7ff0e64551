"""viaduct: a configuration-centred LLM training framework on pure PyTorch."""

__version__ = "0.1.0"
