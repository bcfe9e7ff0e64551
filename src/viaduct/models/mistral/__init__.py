"""Mistral model providers with their published shapes."""

from viaduct.models.mistral.provider import MistralModelProvider, MistralModelProvider7B

__all__ = ["MistralModelProvider", "MistralModelProvider7B"]
