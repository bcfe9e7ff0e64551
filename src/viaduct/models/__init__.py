"""Model providers (configuration) and, later, the models they build."""

from viaduct.models.enums import AttnBackend
from viaduct.models.gpt import GPTModelProvider
from viaduct.models.provider import ModelProvider
from viaduct.models.transformer_config import TransformerConfig

__all__ = ["AttnBackend", "GPTModelProvider", "ModelProvider", "TransformerConfig"]
