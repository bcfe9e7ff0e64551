"""T5Model on the CPU: shapes and names, what each attention may see, padding masks, T5's relative
position buckets, the parameter count, init, the loss paths, overfitting one batch, and equality
with Hugging Face's T5 after copying weights (tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.models.common.loss import cross_entropy
from viaduct.models.t5 import T5Model, T5Spec, relative_position_bucket, t5_num_parameters

VOCAB = 96
POSITION_TYPES = ("learned_absolute", "rope", "relative")


def spec(**kw: object) -> T5Spec:
    base: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        encoder_num_layers=2,
        decoder_num_layers=2,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return T5Spec(**base)  # type: ignore[arg-type]


def build(seed: int = 0, **kw: object) -> T5Model:
    model = T5Model(spec(**kw))
    model.init_weights(seed)
    # The output bias starts at 0; a non-zero one makes the tests see whether it is applied.
    if model.output_layer.bias is not None:
        with torch.no_grad():
            model.output_layer.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def tokens(b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def other_token(t: torch.Tensor) -> torch.Tensor:
    return (t + 1) % VOCAB


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_shapes_loss_and_names(position_embedding_type: str, tied: bool) -> None:
    model = build(position_embedding_type=position_embedding_type, share_embeddings_and_output_weights=tied)
    enc, dec = tokens(2, 9), tokens(2, 5, seed=2)
    logits = model(enc, dec)
    assert logits.shape == (2, 5, VOCAB)
    loss = model(enc, dec, labels=dec)
    assert loss.shape == (2, 5) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, cross_entropy(logits, dec))
    names = dict(model.named_parameters())
    assert names["embedding.word_embeddings.weight"].shape == (VOCAB, 32)
    assert names["encoder.layers.1.self_attention.linear_qkv.weight"].shape == (96, 32)
    assert names["decoder.layers.1.cross_attention.linear_q.weight"].shape == (32, 32)
    assert names["decoder.layers.1.cross_attention.linear_kv.weight"].shape == (64, 32)
    assert "decoder.layers.0.pre_cross_attn_layernorm.weight" in names
    assert "encoder.final_layernorm.weight" in names and "decoder.final_layernorm.weight" in names
    if tied:
        assert names["output_layer.bias"].shape == (VOCAB,) and "output_layer.weight" not in names
        # The logits use the token table, plus the bias.
        assert model.output_weight() is names["embedding.word_embeddings.weight"]
        bias = names["output_layer.bias"]
        with torch.no_grad():
            bias_before = bias.clone()
            bias.zero_()
            unbiased = model(enc, dec)
        torch.testing.assert_close(logits - unbiased, bias_before.expand_as(logits))
    else:
        assert names["output_layer.weight"].shape == (VOCAB, 32) and "output_layer.bias" not in names
    assert ("embedding.position_embeddings.weight" in names) == (
        position_embedding_type == "learned_absolute"
    )
    relative = position_embedding_type == "relative"
    assert ("encoder_relative_pos_emb.relative_attention_bias.weight" in names) == relative
    assert ("decoder_relative_pos_emb.relative_attention_bias.weight" in names) == relative


def test_negative_labels_carry_no_loss() -> None:
    # The span-corruption data pads its labels with -1 (Megatron's value), Hugging Face's with -100.
    model = build()
    enc, dec = tokens(2, 9), tokens(2, 6, seed=2)
    full = model(enc, dec, labels=dec)
    for pad in (-1, -100):
        labels = dec.clone()
        labels[:, 4:] = pad
        loss = model(enc, dec, labels=labels)
        assert torch.equal(loss[:, 4:], torch.zeros(2, 2))
        torch.testing.assert_close(loss[:, :4], full[:, :4])


# ---------------------------------------------------------------------------------------------- visibility


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
def test_decoder_is_causal(position_embedding_type: str) -> None:
    model = build(position_embedding_type=position_embedding_type)
    enc, dec = tokens(2, 8), tokens(2, 7, seed=2)
    with torch.no_grad():
        base = model(enc, dec)
        for t in range(1, 7):
            changed = dec.clone()
            changed[:, t:] = other_token(changed[:, t:])
            out = model(enc, changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t], base[:, t], atol=1e-4)


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
def test_encoder_is_bidirectional(position_embedding_type: str) -> None:
    model = build(position_embedding_type=position_embedding_type)
    enc = tokens(2, 8)
    changed = enc.clone()
    changed[:, -1] = other_token(changed[:, -1])
    with torch.no_grad():
        before, after = model.encode(enc), model.encode(changed)
    # The first encoder position sees the last token.
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
def test_cross_attention_sees_every_encoder_token(position_embedding_type: str) -> None:
    model = build(position_embedding_type=position_embedding_type)
    enc, dec = tokens(1, 8), tokens(1, 4, seed=2)
    with torch.no_grad():
        base = model(enc, dec)[:, 0]
        for j in range(8):
            changed = enc.clone()
            changed[:, j] = other_token(changed[:, j])
            assert (model(changed, dec)[:, 0] - base).abs().max() > 1e-5, j


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
def test_padding_masks_hide_padded_tokens(position_embedding_type: str) -> None:
    model = build(position_embedding_type=position_embedding_type)
    enc, dec = tokens(2, 8), tokens(2, 6, seed=2)
    enc_keep = torch.ones(2, 8, dtype=torch.bool)
    enc_keep[0, 5:] = False  # right padding in the encoder
    dec_keep = torch.ones(2, 6, dtype=torch.bool)
    dec_keep[1, :2] = False  # left padding in the decoder
    changed_enc, changed_dec = enc.clone(), dec.clone()
    changed_enc[0, 5:] = other_token(changed_enc[0, 5:])
    changed_dec[1, :2] = other_token(changed_dec[1, :2])
    with torch.no_grad():
        base_logits = model(enc, dec, enc_keep, dec_keep)
        logits = model(changed_enc, changed_dec, enc_keep, dec_keep)
        base_hidden, hidden = model.encode(enc, enc_keep), model.encode(changed_enc, enc_keep)
        unmasked = model(changed_enc, changed_dec)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(hidden[0, :5], base_hidden[0, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[0], base_logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[1, 2:], base_logits[1, 2:], rtol=0, atol=1e-6)
    # Without the masks the same changes do show.
    assert (unmasked[0] - base_logits[0]).abs().max() > 1e-4
    # The cross-attention mask defaults to the encoder's, and can be given on its own.
    with torch.no_grad():
        explicit = model(changed_enc, changed_dec, enc_keep, dec_keep, encoder_decoder_attn_mask=enc_keep)
    torch.testing.assert_close(explicit, logits)


def test_fully_padded_rows_stay_finite_and_gradients_too() -> None:
    model = build(position_embedding_type="relative").train()
    enc, dec = tokens(2, 6), tokens(2, 5, seed=2)
    dec_keep = torch.ones(2, 5, dtype=torch.bool)
    dec_keep[0, :3] = False  # the first queries see only padding
    labels = dec.masked_fill(~dec_keep, -100)
    loss = model(enc, dec, decoder_attn_mask=dec_keep, labels=labels)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reusing_encoder_hidden_states() -> None:
    model = build(position_embedding_type="relative")
    enc, dec = tokens(2, 7), tokens(2, 4, seed=2)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    with torch.no_grad():
        states = model.encode(enc, keep)
        torch.testing.assert_close(
            model(enc, dec, keep, encoder_hidden_states=states), model(enc, dec, keep), rtol=0, atol=0
        )


# ---------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 20), (8, 64), (4, 8)])
def test_relative_buckets_match_hugging_face(
    bidirectional: bool, num_buckets: int, max_distance: int
) -> None:
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-600, 601)[None, :] + torch.tensor([[0], [1]])
    expected = modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(got, expected)
    assert got.min() >= 0 and got.max() < num_buckets


def test_relative_bias_is_shared_per_stack_and_directional() -> None:
    model = build(position_embedding_type="relative")
    assert model.encoder_relative_pos_emb is not None and model.decoder_relative_pos_emb is not None
    enc_bias = model.encoder_relative_pos_emb(5, 5)
    assert enc_bias.shape == (1, 4, 5, 5)
    # Bidirectional: "one key ahead" and "one key behind" read different rows of the table.
    table = model.encoder_relative_pos_emb.relative_attention_bias.weight
    torch.testing.assert_close(enc_bias[0, :, 0, 1], table[17])
    torch.testing.assert_close(enc_bias[0, :, 1, 0], table[1])
    dec_bias = model.decoder_relative_pos_emb(5, 5)
    dec_table = model.decoder_relative_pos_emb.relative_attention_bias.weight
    torch.testing.assert_close(dec_bias[0, :, 3, 0], dec_table[3])


# ---------------------------------------------------------------------------------------------- size


PARAM_CONFIGS: list[dict[str, object]] = [
    {},
    dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
    dict(position_embedding_type="relative", normalization="RMSNorm", add_bias_linear=False),
    dict(
        gated_linear_unit=True, activation="silu", kv_channels=16, encoder_num_layers=3, decoder_num_layers=1
    ),
    dict(position_embedding_type="relative", relative_attention_num_buckets=16, num_attention_heads=8),
]


@pytest.mark.parametrize("kw", PARAM_CONFIGS)
def test_parameter_count_formula(kw: dict[str, object]) -> None:
    s = spec(**kw)
    model = T5Model(s, device="meta")
    assert sum(p.numel() for p in model.parameters()) == t5_num_parameters(s)


T5_BASE_LIKE_PARAMETERS = 223_578_496
"""12 + 12 layers, hidden 768, ffn 3072, 12 heads, vocabulary 32128, learned positions (512), LayerNorm,
biases, tied output with its bias: Megatron's T5-base shape."""


def test_t5_base_like_parameter_count() -> None:
    s = T5Spec(
        vocab_size=32128,
        hidden_size=768,
        ffn_hidden_size=3072,
        num_attention_heads=12,
        encoder_num_layers=12,
        decoder_num_layers=12,
    )
    model = T5Model(s, device="meta")
    assert sum(p.numel() for p in model.parameters()) == t5_num_parameters(s) == T5_BASE_LIKE_PARAMETERS


# ---------------------------------------------------------------------------------------------- init


def test_init_weights_is_deterministic_per_seed() -> None:
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("linear_qkv.weight") or name.endswith("word_embeddings.weight"):
            assert not torch.equal(pa, pc), name
    model = T5Model(spec(position_embedding_type="relative"))
    model.init_weights(0)
    assert torch.count_nonzero(model.output_layer.bias) == 0  # type: ignore[arg-type]
    # Residual-stream projections are scaled down by the depth of their stack.
    proj = model.decoder.layers[0].self_attention.linear_proj.weight
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert proj.std() < 0.75 * qkv.std()
    # A part's values do not depend on the others: a deeper decoder keeps the same encoder layers.
    deeper = T5Model(spec(position_embedding_type="relative", decoder_num_layers=3))
    deeper.init_weights(0)
    torch.testing.assert_close(
        deeper.encoder.layers[1].mlp.linear_fc1.weight, model.encoder.layers[1].mlp.linear_fc1.weight
    )


def test_meta_build_then_init_equals_a_direct_build() -> None:
    for kind in POSITION_TYPES:
        direct = T5Model(spec(position_embedding_type=kind))
        direct.init_weights(7)
        meta = T5Model(spec(position_embedding_type=kind), device="meta").to_empty(device="cpu")
        meta.init_weights(7)
        for (name, a), b in zip(direct.state_dict().items(), meta.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        enc, dec = tokens(1, 5), tokens(1, 4)
        with torch.no_grad():
            torch.testing.assert_close(meta.eval()(enc, dec), direct.eval()(enc, dec), rtol=0, atol=0)


def test_bfloat16_parameters_with_padding_and_relative_bias() -> None:
    model = T5Model(spec(position_embedding_type="relative", params_dtype=torch.bfloat16))
    model.init_weights(0)
    enc, dec = tokens(2, 6), tokens(2, 5, seed=2)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 3:] = False
    logits = model(enc, dec, keep)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    loss = model(enc, dec, keep, labels=dec)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


# ---------------------------------------------------------------------------------------------- loss


def test_chunked_loss_with_the_tied_output_bias_equals_the_plain_loss() -> None:
    model = build(position_embedding_type="relative")
    enc, dec = tokens(2, 6), tokens(2, 5, seed=2)
    labels = dec.clone()
    labels[0, -1] = -100
    plain = model(enc, dec, labels=labels)
    model.loss_plain_bytes = 0  # the chunked path even on the CPU
    chunked = model(enc, dec, labels=labels)
    torch.testing.assert_close(chunked, plain)
    assert chunked[0, -1] == 0
    chunked.sum().backward()
    assert model.output_layer.bias is not None and model.output_layer.bias.grad is not None
    assert model.output_layer.bias.grad.abs().sum() > 0


class PlainVocabOutput:
    """A stand-in for a vocabulary-parallel output: the plain computation, from the weight it gets."""

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hidden @ weight.T

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(hidden @ weight.T, labels)


def test_vocab_output_hook_gets_the_output_bias_folded_in() -> None:
    model = build()
    enc, dec = tokens(2, 6), tokens(2, 5, seed=2)
    with torch.no_grad():
        logits, loss = model(enc, dec), model(enc, dec, labels=dec)
        model.vocab_output = PlainVocabOutput()
        torch.testing.assert_close(model(enc, dec), logits)
        torch.testing.assert_close(model(enc, dec, labels=dec), loss)


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build(position_embedding_type="relative").train()
    enc, dec = tokens(4, 12), tokens(4, 8, seed=2)
    labels = torch.roll(dec, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss = model(enc, dec, labels=labels).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first is not None and loss.item() < 0.1 * first


# ---------------------------------------------------------------------------------------------- errors


def test_bad_spec_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        spec(hidden_size=30, position_embedding_type="alibi", activation="nope", hidden_dropout=1.5)
    text = str(err.value)
    for field in ("kv_channels", "position_embedding_type", "activation", "hidden_dropout"):
        assert field in text
    with pytest.raises(ConfigError, match="relative_attention_num_buckets"):
        spec(position_embedding_type="relative", relative_attention_num_buckets=2)


def test_bad_inputs_raise_value_errors() -> None:
    model = build()
    enc, dec = tokens(2, 6), tokens(2, 5)
    with pytest.raises(ValueError, match="encoder_attn_mask"):
        model(enc, dec, encoder_attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(tokens(1, 65), tokens(1, 3))
    with pytest.raises(ValueError, match="batch size"):
        model(enc, tokens(3, 5))
    with pytest.raises(ValueError, match="labels"):
        model(enc, dec, labels=tokens(2, 4))
    # Relative positions have no length limit.
    relative = build(position_embedding_type="relative")
    assert relative(tokens(1, 80), tokens(1, 70)).shape == (1, 70, VOCAB)


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    ("feed_forward_proj", "activation", "gated"),
    [("relu", "relu", False), ("gated-gelu", "fast_gelu", True)],
)
def test_matches_hugging_face_t5_after_copying_weights(
    feed_forward_proj: str, activation: str, gated: bool
) -> None:
    """T5 v1.1's architecture: relative position bias, RMSNorm, no biases, unscaled attention scores,
    an untied output layer (and v1.1's GeGLU MLP with the tanh GELU)."""
    transformers = pytest.importorskip("transformers")
    heads, d_kv, hidden = 4, 8, 32
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=hidden,
        d_kv=d_kv,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=heads,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=24,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # Hugging Face initializes some tensors to exact constants; make them all random
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    s = spec(
        hidden_size=hidden,
        ffn_hidden_size=48,
        num_attention_heads=heads,
        kv_channels=d_kv,
        encoder_num_layers=2,
        decoder_num_layers=3,
        position_embedding_type="relative",
        relative_attention_num_buckets=16,
        relative_attention_max_distance=24,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        activation=activation,
        gated_linear_unit=gated,
        add_bias_linear=False,
        share_embeddings_and_output_weights=False,
        softmax_scale=1.0,
    )
    model = T5Model(s).eval()
    missing = set(dict(model.named_parameters()))
    with torch.no_grad():
        for name, value in hf_to_viaduct(hf.state_dict(), heads, d_kv, hidden).items():
            dict(model.named_parameters())[name].copy_(value)
            missing.discard(name)
    assert not missing

    enc, dec = tokens(2, 30), tokens(2, 26, seed=2)
    enc_keep = torch.ones(2, 30, dtype=torch.long)
    enc_keep[1, 21:] = 0
    dec_keep = torch.ones(2, 26, dtype=torch.long)
    dec_keep[1, 20:] = 0
    with torch.no_grad():
        expected = hf(
            input_ids=enc, attention_mask=enc_keep, decoder_input_ids=dec, decoder_attention_mask=dec_keep
        ).logits
        got = model(enc, dec, enc_keep, dec_keep)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, :20], expected[1, :20], rtol=1e-4, atol=1e-4)


def hf_to_viaduct(sd: dict[str, torch.Tensor], heads: int, d_kv: int, hidden: int) -> dict[str, torch.Tensor]:
    """Hugging Face T5 weights under viaduct's names, with Megatron's per-head row grouping."""

    def per_head(*mats: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.view(heads, d_kv, hidden) for m in mats], dim=1).reshape(-1, hidden)

    out = {
        "embedding.word_embeddings.weight": sd["shared.weight"],
        "output_layer.weight": sd["lm_head.weight"],
    }
    for stack in ("encoder", "decoder"):
        out[f"{stack}_relative_pos_emb.relative_attention_bias.weight"] = sd[
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ]
        out[f"{stack}.final_layernorm.weight"] = sd[f"{stack}.final_layer_norm.weight"]
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"{stack}.block."))
        for i in range(n):
            hf_l, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            att = f"{hf_l}.0.SelfAttention"
            out[f"{ours}.input_layernorm.weight"] = sd[f"{hf_l}.0.layer_norm.weight"]
            out[f"{ours}.self_attention.linear_qkv.weight"] = per_head(
                sd[f"{att}.q.weight"], sd[f"{att}.k.weight"], sd[f"{att}.v.weight"]
            )
            out[f"{ours}.self_attention.linear_proj.weight"] = sd[f"{att}.o.weight"]
            ff = 1
            if stack == "decoder":
                cross = f"{hf_l}.1.EncDecAttention"
                out[f"{ours}.pre_cross_attn_layernorm.weight"] = sd[f"{hf_l}.1.layer_norm.weight"]
                out[f"{ours}.cross_attention.linear_q.weight"] = sd[f"{cross}.q.weight"]
                out[f"{ours}.cross_attention.linear_kv.weight"] = per_head(
                    sd[f"{cross}.k.weight"], sd[f"{cross}.v.weight"]
                )
                out[f"{ours}.cross_attention.linear_proj.weight"] = sd[f"{cross}.o.weight"]
                ff = 2
            out[f"{ours}.pre_mlp_layernorm.weight"] = sd[f"{hf_l}.{ff}.layer_norm.weight"]
            mlp = f"{hf_l}.{ff}.DenseReluDense"
            if f"{mlp}.wi.weight" in sd:
                out[f"{ours}.mlp.linear_fc1.weight"] = sd[f"{mlp}.wi.weight"]
            else:  # gated: rows interleaved as (gate unit i, up unit i)
                gate, up = sd[f"{mlp}.wi_0.weight"], sd[f"{mlp}.wi_1.weight"]
                out[f"{ours}.mlp.linear_fc1.weight"] = torch.stack((gate, up), dim=1).reshape(-1, hidden)
            out[f"{ours}.mlp.linear_fc2.weight"] = sd[f"{hf_l}.{ff}.DenseReluDense.wo.weight"]
    return out


def test_spec_is_frozen() -> None:
    s = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hidden_size = 8  # type: ignore[misc]


def test_per_layer_compile_covers_encoder_and_decoder_layers() -> None:
    """`compile_model(scope="layers")` (what FSDP runs use) compiles T5's decoder layers too (they
    are no transformer layers), with the eager model's loss."""
    from viaduct.models.compile import compile_model

    torch._dynamo.reset()
    eager, compiled = build(), build()
    compile_model(compiled, "layers", backend="aot_eager")
    layers = [*compiled.encoder.layers, *compiled.decoder.layers]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    enc, dec = tokens(2, 12), tokens(2, 6, seed=2)
    torch.testing.assert_close(
        compiled(enc, dec, labels=dec), eager(enc, dec, labels=dec), rtol=1e-5, atol=1e-5
    )
    torch._dynamo.reset()


RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=("core_attn", "mlp")),
}


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_recompute_gives_the_same_loss_and_gradients(position_embedding_type: str, recompute: str) -> None:
    """Activation recompute in both stacks (with dropout on, padding masks and 3 encoder layers against
    2 decoder layers) re-runs the recomputed parts in backward and changes neither the loss nor a
    gradient."""
    kw: dict[str, object] = dict(
        position_embedding_type=position_embedding_type,
        encoder_num_layers=3,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    enc, dec = tokens(2, 12), tokens(2, 6, seed=2)
    enc_mask = torch.ones(2, 12, dtype=torch.bool)
    enc_mask[1, 9:] = False

    def run(model: T5Model) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
        calls = {"mlp": 0, "cross": 0}
        for layer in [*model.encoder.layers, *model.decoder.layers]:
            # A pre-hook: recompute stops as soon as it has what backward needs, before a module's
            # forward hooks would run.
            layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
        for layer in model.decoder.layers:
            attn = layer.cross_attention
            kernel = attn.core_attention

            def counted(*args: torch.Tensor | None, kernel=kernel) -> torch.Tensor:  # type: ignore[no-untyped-def]
                calls["cross"] += 1
                return kernel(*args)

            attn.core_attention = counted  # type: ignore[method-assign]
        model.train()
        torch.manual_seed(11)  # the dropout masks
        loss = model(enc, dec, enc_mask, labels=dec)
        loss.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, calls

    plain_loss, plain_grads, plain_calls = run(build(**kw))
    loss, grads, calls = run(build(**kw, **RECOMPUTE[recompute]))
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert plain_calls == {"mlp": 5, "cross": 2}
    # Recomputed parts run again in backward: every layer (uniform, selective), the first of each
    # stack (block: 1 encoder + 1 decoder layer, one cross-attention).
    expected = {"full-uniform": (10, 4), "full-block": (7, 3), "selective": (10, 4)}[recompute]
    assert (calls["mlp"], calls["cross"]) == expected


def test_recompute_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        spec(recompute_granularity="full")
    assert {p.path for p in err.value.problems} == {"recompute_method", "recompute_num_layers"}
    with pytest.raises(ConfigError) as err:
        spec(recompute_granularity="selective", recompute_modules=("layernorm",))
    assert {p.path for p in err.value.problems} == {"recompute_modules"}


TP_CASES = [
    (kind, sp, tied) for kind in POSITION_TYPES for sp, tied in ((False, True), (True, True), (True, False))
]


def _tp_forward_backward(
    rank: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Per case of TP_CASES: the per-token loss, the logits and every parameter's gradient of one
    forward and backward, with the model split over `world` tensor-parallel ranks (1: unsplit)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from viaduct.distributed.t5_parallel import apply_t5_tensor_parallel

    out = []
    enc, dec = tokens(2, 12), tokens(2, 6, seed=2)
    enc_mask = torch.ones(2, 12, dtype=torch.bool)
    enc_mask[1, 9:] = False
    for kind, sp, tied in TP_CASES:
        model = build(position_embedding_type=kind, share_embeddings_and_output_weights=tied)
        if world > 1:
            apply_t5_tensor_parallel(model, init_device_mesh("cpu", (world,)), sequence_parallel=sp)
        loss = model(enc, dec, enc_mask, labels=dec)
        loss.sum().backward()
        logits = model(enc, dec, enc_mask)
        grads = {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach()
            for n, p in model.named_parameters()
        }
        out.append((loss.detach(), logits.detach(), grads))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_split_gives_the_unsplit_loss_logits_and_gradients() -> None:
    """`apply_t5_tensor_parallel` over 2 ranks, with every position type (the relative bias tables split
    by heads), with and without sequence parallelism, tied (with the output bias) and untied output:
    the same per-token loss, full logits and gradients as the unsplit model."""
    from viaduct.testing import run_distributed

    one = _tp_forward_backward(0, 1)
    for rank in run_distributed(_tp_forward_backward, 2, timeout=240, all_ranks=True):
        for case, (want, got) in zip(TP_CASES, zip(one, rank, strict=True), strict=True):
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=str(case))
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5, msg=str(case))
            assert got[2].keys() == want[2].keys()
            for name, grad in want[2].items():
                torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
