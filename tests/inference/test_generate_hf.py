"""Generation against Hugging Face transformers as the oracle: tiny random models of each supported
family (Mamba-2 and Nemotron-H included), converted by `viaduct.AutoBridge`, generate greedily with
the KV cache exactly the tokens that transformers' own forward chooses; and `viaduct generate --hf
DIR` end to end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
conversion = pytest.importorskip("viaduct.models.conversion")

from viaduct.cli.main import main  # noqa: E402
from viaduct.data import builtin  # noqa: E402
from viaduct.data.tokenizers import build_tokenizer  # noqa: E402
from viaduct.inference import generate, generate_tokens  # noqa: E402
from viaduct.training.config import TokenizerConfig  # noqa: E402

VOCAB = 96
SMALL = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)

# The position and attention variants: RoPE with grouped-query attention, QK norm (Qwen 3), a sliding
# window shorter than the sequence (Mistral), learned absolute positions (GPT-2).
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(**SMALL, num_key_value_heads=2, max_position_embeddings=64),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            **SMALL, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(**SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    # Mamba-2: a scan state instead of keys and values; prompts span several chunks of 4.
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            state_size=8,
            head_dim=8,
            num_heads=8,
            expand=2,
            n_groups=2,
            chunk_size=4,
            tie_word_embeddings=False,
        ),
    ),
    # Nemotron-H: Mamba, attention (no positions) and squared-ReLU MLP layers.
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(
            hidden_size=32,
            hybrid_override_pattern="M*M-",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=8,
            intermediate_size=48,
            chunk_size=4,
            tie_word_embeddings=False,
        ),
    ),
}


def hf_model(arch: str, vocab: int = VOCAB, seed: int = 0) -> Any:
    config_name, model_name, kwargs = ARCHS[arch]
    config = getattr(transformers, config_name)(vocab_size=vocab, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # every weight drawn, so that the models' choices are clear-cut
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if p.ndim == 1 and ("norm" in name or ".ln_" in name or "layernorm" in name):
                p.add_(1.0)
    return model


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """transformers' full forward over the whole sequence again for every token (no cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def convert(directory: Path) -> Any:
    return (
        conversion.AutoBridge.from_hf_pretrained(directory)
        .to_megatron_provider()
        .provide(device="cpu")
        .eval()
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_transformers(arch: str, tmp_path: Path) -> None:
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    model = convert(tmp_path)
    prompts = [
        torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 9)
    ]
    got = generate_tokens(model, prompts, max_new_tokens=12)
    assert got == [hf_greedy(hf, p, 12) for p in prompts]
    # And transformers' own generate (greedy, with its cache), prompt by prompt.
    hf.generation_config.eos_token_id = None  # no early stop: both produce 12 tokens
    for prompt, tokens in zip(prompts, got):
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0)
        assert out[0, len(prompt) :].tolist() == tokens


@pytest.mark.slow
def test_generate_command_loads_a_hugging_face_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer_dir = Path(builtin.resolve_tokenizer("builtin:pydoc-bpe"))
    tokenizer = build_tokenizer(
        TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer_dir))
    )
    hf_model("llama", vocab=tokenizer.vocab_size).save_pretrained(tmp_path)
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    code = main(
        [
            "generate",
            "--hf",
            str(tmp_path),
            "--prompt",
            "import",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    expected = generate(convert(tmp_path), tokenizer, "import", max_new_tokens=6)[0]
    assert out.out == f"import{expected}\n"
