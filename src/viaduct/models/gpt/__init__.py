"""GPT-style decoder-only models."""

from viaduct.models.gpt.provider import GPTModelProvider

__all__ = ["GPTModelProvider"]
