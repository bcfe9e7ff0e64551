"""viaduct: a configuration-centred LLM training framework on pure PyTorch."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.models.conversion import AutoBridge

__all__ = ["AutoBridge", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `import viaduct` stays cheap (no torch): AutoBridge loads the model code on first use.
    if name == "AutoBridge":
        from viaduct.models.conversion import AutoBridge

        return AutoBridge
    raise AttributeError(f"module 'viaduct' has no attribute {name!r}")
