"""The T5 forward step leaves the decoder's padding mask out only where causal attention gives the
same losses and gradients: right-padded rows whose padding carries no loss."""

from __future__ import annotations

import pytest
import torch

from viaduct.models.t5 import T5Model, T5Spec
from viaduct.training.gpt_step import loss_func
from viaduct.training.t5_step import causal_covers_padding, forward_step

VOCAB = 64


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_causal_covers_right_padding_without_loss_only() -> None:
    right = _mask([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert causal_covers_padding(right, right.float())
    # A hole (or left padding): a real token would see a padded one under causal attention alone.
    assert not causal_covers_padding(_mask([[1, 0, 1, 0]]), _mask([[1, 0, 1, 0]]).float())
    assert not causal_covers_padding(_mask([[0, 1, 1, 1]]), _mask([[0, 1, 1, 1]]).float())
    # A loss on a padded position depends on what the padding sees.
    assert not causal_covers_padding(_mask([[1, 1, 0, 0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # A loss mask of another shape is left for the model and the loss to report.
    assert not causal_covers_padding(right, right.float().view(-1))
    # Tensors on a device are not read (that would wait for it): the mask stays.
    assert not causal_covers_padding(right.to("meta"), right.float())


class _State:
    device = torch.device("cpu")


def _batch(dec_rows: list[list[int]], enc_len: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    dec_mask = _mask(dec_rows)
    b, s = dec_mask.shape
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    enc_mask = torch.ones(b, enc_len, dtype=torch.bool)
    enc_mask[0, -2:] = False
    return {
        "text_enc": torch.randint(0, VOCAB, (b, enc_len), generator=g),
        "text_dec": torch.randint(0, VOCAB, (b, s), generator=g),
        "labels": torch.where(dec_mask, labels, -1),
        "loss_mask": dec_mask.float(),
        "enc_mask": enc_mask,
        "dec_mask": dec_mask,
        "enc_dec_mask": enc_mask.clone(),
    }


class _Recorder(torch.nn.Module):
    """The T5 model, remembering which decoder mask each call got."""

    def __init__(self, model: T5Model) -> None:
        super().__init__()
        self.model = model
        self.dec_masks: list[torch.Tensor | None] = []

    def forward(self, *args: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        self.dec_masks.append(args[3])
        return self.model(*args, labels=labels)


@pytest.mark.parametrize("position_embedding_type", ["learned_absolute", "relative"])
def test_the_step_drops_the_mask_only_where_losses_and_gradients_stay_the_same(
    position_embedding_type: str,
) -> None:
    spec = T5Spec(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        encoder_num_layers=1,
        decoder_num_layers=2,
        max_position_embeddings=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        position_embedding_type=position_embedding_type,
    )
    model = T5Model(spec)
    model.init_weights(0)
    recorder = _Recorder(model)
    batch = _batch([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0], [1] * 8])

    def loss_and_grads(step_batch: dict[str, torch.Tensor], masked: bool) -> tuple[torch.Tensor, list]:
        model.zero_grad()
        if masked:  # the model called directly, with the padding mask
            out = model(
                *(step_batch[k] for k in ("text_enc", "text_dec", "enc_mask", "dec_mask", "enc_dec_mask")),
                labels=step_batch["labels"],
            )
            loss = loss_func(step_batch["loss_mask"], out)[0]
        else:
            out, fn = forward_step(_State(), iter([step_batch]), recorder)  # type: ignore[arg-type]
            loss = fn(out)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    stepped, stepped_grads = loss_and_grads(batch, masked=False)
    assert recorder.dec_masks[-1] is None  # causal attention alone
    masked, masked_grads = loss_and_grads(batch, masked=True)
    torch.testing.assert_close(stepped, masked)
    for a, b in zip(stepped_grads, masked_grads, strict=True):
        torch.testing.assert_close(a, b)

    # Left padding: the step keeps the mask, so losses still match the masked model.
    left = _batch([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]])
    stepped, _ = loss_and_grads(left, masked=False)
    assert recorder.dec_masks[-1] is not None
    torch.testing.assert_close(stepped, loss_and_grads(left, masked=True)[0])
