"""Generation from a trained model with a KV cache (`viaduct generate` on the command line).

    from viaduct.inference import generate, load_checkpoint

    loaded = load_checkpoint("runs/tiny_gpt/checkpoints")
    generate(loaded.model, loaded.tokenizer, ["The list type", "import"], max_new_tokens=40)

`generate_tokens` is the same on token ids; `KVCache` and `GPTModel.forward(..., kv_cache=,
cache_position=)` are the step underneath; `viaduct.inference.sampling` chooses the tokens.
"""

from viaduct.inference.generate import generate, generate_tokens
from viaduct.inference.kv_cache import KVCache
from viaduct.inference.load import LoadedModel, load_checkpoint
from viaduct.inference.sampling import filter_logits, sample

__all__ = [
    "KVCache",
    "LoadedModel",
    "filter_logits",
    "generate",
    "generate_tokens",
    "load_checkpoint",
    "sample",
]
