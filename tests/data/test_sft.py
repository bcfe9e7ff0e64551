"""Fine-tuning data: records, answer masks, truncation, padded batches, packing and its cache, config."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.config import ConfigError, apply_overrides
from viaduct.data.loaders import build_train_valid_test_data_iterators, build_train_valid_test_datasets
from viaduct.data.samplers import PretrainingSampler
from viaduct.data.sft.build import SFTDataWarning, pack_paths
from viaduct.data.sft.dataset import PadCollate, SFTDataset, pad_multiple
from viaduct.data.sft.examples import build_examples
from viaduct.data.sft.packing import PackCacheWarning, first_fit_shuffle, pack_examples, packed_sample
from viaduct.data.sft.records import RecordReader, SFTDataError
from viaduct.data.tokenizers import ByteLevelTokenizer, build_tokenizer
from viaduct.testing import tiny_pretrain_config
from viaduct.training.config import FinetuningDatasetConfig, PackedSequenceSpecs
from viaduct.training.config.finetuning import SFTOptions

TOK = ByteLevelTokenizer()
EOD, BOS = TOK.eod, TOK.bos


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_root(tmp_path: Path, n: int = 24, *, name: str = "data") -> Path:
    root = tmp_path / name
    root.mkdir()
    for split, k in (("training", n), ("validation", 6), ("test", 6)):
        recs = [
            {"input": f"q{split[0]}{i} " + "z" * (i % 9), "output": f"a{i}" + "y" * (i % 5)} for i in range(k)
        ]
        write_jsonl(root / f"{split}.jsonl", recs)
    return root


def examples_of(records: list[object], tmp_path: Path, max_tokens: int = 100, **opts: object):
    options = SFTOptions(**opts)  # type: ignore[arg-type]
    recs = RecordReader(options, None).read(write_jsonl(tmp_path / "r.jsonl", records))
    return build_examples(recs, TOK, options, max_tokens)


def sft_config(root: Path, *overrides: str, seq_length: int = 32):
    cfg = tiny_pretrain_config(seq_length=seq_length)
    apply_overrides(
        cfg, ["dataset=finetuning", f"dataset.dataset_root={root}", "dataset.num_workers=0", *overrides]
    )
    return cfg


def datasets(cfg, counts=(16, 8, 8)):
    cfg.validate(world_size=1)
    return build_train_valid_test_datasets(cfg, build_tokenizer(cfg.tokenizer), counts)


# ------------------------------------------------------------------------------ answer masks


def test_answer_only_loss_masks_exactly_the_prompt(tmp_path):
    (ex,), _ = examples_of([{"input": "ab", "output": "cd"}], tmp_path)
    assert ex.ids.tolist() == [*b"ab cd", EOD]  # "{input} {output}", eod appended (add_eos)
    sample = SFTDataset([ex], 1, seed=0, split="train", answer_only_loss=True)[0]
    assert sample["tokens"].tolist() == list(b"ab cd")
    assert sample["labels"].tolist() == [*b"b cd", EOD]
    # labels b, " " are prompt; c, d, eod are the answer
    assert sample["loss_mask"].tolist() == [0, 0, 1, 1, 1]
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 4]


def test_template_bos_sep_and_extra_placeholders(tmp_path):
    recs = [{"question": "Q", "context": "C", "answer": "A"}]
    (ex,), _ = examples_of(
        recs,
        tmp_path,
        prompt_template="{context}|{question}={answer}!",
        label_key="answer",
        truncation_field="context",
        add_bos=True,
        add_sep=True,
        add_eos=False,
    )
    assert ex.ids.tolist() == [BOS, *b"C|Q=", EOD, *b"A!"]  # the sep is the eod id
    assert ex.answer.tolist() == [False] * 6 + [True, True]  # the answer runs from {answer} on


def test_answer_only_loss_false_masks_only_padding(tmp_path):
    exs, _ = examples_of([{"input": "ab", "output": "c"}, {"input": "abcdef", "output": "c"}], tmp_path)
    ds = SFTDataset(exs, 2, seed=0, split="train", answer_only_loss=False)
    batch = PadCollate(TOK.pad)([ds[0], ds[1]])
    lengths = sorted([len(exs[0]) - 1, len(exs[1]) - 1])
    assert batch["loss_mask"].sum(1).sort().values.tolist() == lengths
    short = int(batch["loss_mask"].sum(1).argmin())
    assert batch["loss_mask"][short].tolist() == [1] * lengths[0] + [0] * (lengths[1] - lengths[0])
    assert batch["tokens"][short, lengths[0] :].eq(TOK.pad).all()


CHAT = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
DIALOG = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
]


def test_messages_records_take_loss_on_the_assistant_answers_only(tmp_path):
    from viaduct.data.sft.chat import ChatTemplate

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": DIALOG}, {"input": "a", "output": "b"}])
    options = SFTOptions()
    records = RecordReader(options, ChatTemplate(CHAT)).read(path)
    (chat, plain), _ = build_examples(records, TOK, options, 200)
    text = b"<user>hi</s><assistant>yo</s><user>again</s><assistant>ok</s>"
    assert chat.ids.tolist() == list(text)  # the template writes its own ends: no eod added
    answer = bytes(chat.ids[chat.answer].tolist())
    assert answer == b"yo</s>ok</s>"
    sample = SFTDataset([chat], 1, seed=0, split="train", answer_only_loss=True)[0]
    learned = bytes(sample["labels"][sample["loss_mask"].bool()].tolist())
    assert learned == b"yo</s>ok</s>"
    assert plain.ids.tolist() == [*b"a b", EOD]  # input/output records still use the prompt template


def test_messages_records_through_the_config_and_chat_false(tmp_path):
    root = make_root(tmp_path)
    for name in ("training", "validation", "test"):
        write_jsonl(root / f"{name}.jsonl", [{"messages": DIALOG}] * 3)
    cfg = sft_config(root, f"tokenizer.chat_template={json.dumps(CHAT)}", seq_length=64)
    train, _, _ = datasets(cfg, counts=(3, 0, 0))
    assert bytes(train.examples[0].ids[train.examples[0].answer].tolist()) == b"yo</s>ok</s>"
    with pytest.raises(SFTDataError, match="misses 'input', 'output'.*chat is not false"):
        datasets(
            sft_config(
                root, f"tokenizer.chat_template={json.dumps(CHAT)}", "dataset.dataset_kwargs={chat: false}"
            )
        )
    with pytest.raises(SFTDataError) as exc:
        datasets(sft_config(root))
    assert "tokenizer.chat_template" in str(exc.value) and "training.jsonl:1" in str(exc.value)


def test_chat_template_errors_name_the_record(tmp_path):
    from viaduct.data.sft.chat import ChatTemplate

    tpl = ChatTemplate("{% for m in messages %}{{ m.content / 0 }}{% endfor %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": DIALOG}])
    with pytest.raises(SFTDataError) as exc:
        RecordReader(SFTOptions(), tpl).read(path)
    (p,) = exc.value.problems
    assert p.path == f"{path}:1" and "chat template" in p.message


# ------------------------------------------------------------------------------ truncation


def test_truncation_cuts_the_truncation_field_right_or_left(tmp_path):
    rec = [{"input": "abcdefghij", "output": "XY"}]
    # "abcdefghij XY" + eod = 14 ids; max 10 -> 4 cut from the input
    (right,), stats = examples_of(rec, tmp_path, max_tokens=10)
    assert right.ids.tolist() == [*b"abcdef XY", EOD] and stats.truncated == 1
    (left,), _ = examples_of(rec, tmp_path, max_tokens=10, truncation_method="left")
    assert left.ids.tolist() == [*b"efghij XY", EOD]


def test_truncation_shares_the_cut_over_fields_then_cuts_the_end(tmp_path):
    rec = [{"a": "1234", "b": "5678", "output": "XY"}]
    opts = {"prompt_template": "{a}{b}{output}", "truncation_field": "a,b", "add_eos": False}
    (ex,), _ = examples_of(rec, tmp_path, max_tokens=6, **opts)
    assert ex.ids.tolist() == list(b"1256XY")  # 4 cut: 2 from each field
    # Fields too short: all of them goes, then the end is cut (the answer keeps its start).
    (ex,), _ = examples_of([{"a": "1", "b": "2", "output": "XYZW"}], tmp_path, max_tokens=3, **opts)
    assert ex.ids.tolist() == list(b"XYZ")


def test_example_whose_answer_is_cut_away_is_dropped_with_a_count(tmp_path):
    recs = [
        {"input": "q", "output": "fine"},
        {"input": "q" * 30, "output": "x"},
        {"input": "", "output": "ok"},
    ]
    options = SFTOptions(prompt_template="Question: {input} Answer: {output}")
    path = write_jsonl(tmp_path / "r.jsonl", recs)
    records = RecordReader(options, None).read(path)
    # 14 ids of template text stay whatever is cut from the input: the answer needs more room.
    exs, stats = build_examples(records, TOK, options, 14)
    assert exs == [] and stats.dropped == [f"{path}:1", f"{path}:2", f"{path}:3"]
    exs, stats = build_examples(records, TOK, options, 20)
    assert stats.dropped == [] and stats.truncated == 3
    # All 30 input ids go, then the end (the eod) is cut: the answer "x" survives.
    assert exs[1].ids.tolist() == list(b"Question:  Answer: x")
    assert exs[1].answer.tolist() == [False] * 19 + [True]


def test_dropped_examples_are_warned_about_by_the_builder(tmp_path):
    root = make_root(tmp_path)
    recs = [{"ctx": "c" * 60, "input": "q", "output": "a"}, {"ctx": "", "input": "q", "output": "ok"}]
    for name in ("training", "validation", "test"):
        write_jsonl(root / f"{name}.jsonl", recs)
    cfg = sft_config(root, "dataset.dataset_kwargs={prompt_template: '{ctx}{input} {output}'}")
    with pytest.warns(SFTDataWarning, match=r"dropped 1 of 2 examples .*training.jsonl:1"):
        train, _, _ = datasets(cfg)
    assert len(train.examples) == 1


# ------------------------------------------------------------------------------ bad records


def test_bad_records_name_file_line_and_fix_all_at_once(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"input": "fine", "output": "ok"},
            "{not json",
            "[1, 2]",
            {"input": "no answer"},
            {"input": "x", "output": "   "},
            {"input": 3, "output": "x"},
            {"messages": "hello"},
            "",
            {"messages": [{"role": "user"}]},
        ],
    )
    with pytest.raises(SFTDataError) as exc:
        RecordReader(SFTOptions(), None).read(path)
    problems = {p.path: p for p in exc.value.problems}
    assert sorted(problems) == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 9)]
    assert "not valid JSON" in problems[f"{path}:2"].message
    assert "not an object" in problems[f"{path}:3"].message
    assert "misses 'output'" in problems[f"{path}:4"].message and problems[f"{path}:4"].fix
    assert "empty answer" in problems[f"{path}:5"].message
    assert "not a string" in problems[f"{path}:6"].message
    assert "non-empty list" in problems[f"{path}:7"].message
    assert "'role' and 'content'" in problems[f"{path}:9"].message
    assert all(p.fix for p in exc.value.problems)
    assert f"{path}:2" in str(exc.value)


def test_messages_record_without_a_chat_template_names_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(SFTDataError) as exc:
        RecordReader(SFTOptions(), None, chat_unavailable="tokenizer.chat_template is not set").read(path)
    (p,) = exc.value.problems
    assert p.path == f"{path}:1" and "tokenizer.chat_template" in p.message + (p.fix or "")


def test_reading_stops_after_twenty_problems(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope"] * 100)
    with pytest.raises(SFTDataError) as exc:
        RecordReader(SFTOptions(), None).read(path)
    assert len(exc.value.problems) == 21 and "stopped reading" in exc.value.problems[-1].message


def test_an_oversized_line_is_refused_without_reading_it_whole(tmp_path):
    big = json.dumps({"input": "x" * 5000, "output": "y"})
    path = write_jsonl(
        tmp_path / "big.jsonl", [{"input": "a", "output": "b"}, big, {"input": "c", "output": "d"}]
    )
    with pytest.raises(SFTDataError) as exc:
        RecordReader(SFTOptions(), None, max_line_bytes=1000).read(path)
    (p,) = exc.value.problems
    assert p.path == f"{path}:2" and "over the 1,000-byte limit" in p.message


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(SFTDataError, match="holds no records"):
        RecordReader(SFTOptions(), None).read(write_jsonl(tmp_path / "e.jsonl", []))


# ------------------------------------------------------------------------------ padded batches


def test_padded_batches_pad_to_the_longest_and_to_multiples(tmp_path):
    root = make_root(tmp_path)
    cfg = sft_config(root)
    train, _, _ = datasets(cfg)
    samples = [train[i] for i in range(4)]
    longest = max(int(s["tokens"].numel()) for s in samples)
    batch = train.collate_fn(samples)
    assert batch["tokens"].shape == (4, longest)
    for row, s in enumerate(samples):
        n = int(s["tokens"].numel())
        assert torch.equal(batch["tokens"][row, :n], s["tokens"])
        assert batch["loss_mask"][row, n:].eq(0).all() and batch["tokens"][row, n:].eq(TOK.pad).all()
    assert PadCollate(TOK.pad, 8)(samples)["tokens"].shape[1] == -(-longest // 8) * 8
    assert PadCollate(TOK.pad, 1, fixed_length=32)(samples)["tokens"].shape == (4, 32)
    # The parallel layout's needs: 2·cp with context parallelism, tp with sequence parallelism.
    assert pad_multiple(3, tp=2, cp=2, sequence_parallel=True) == 12
    assert pad_multiple(1, tp=4, cp=1, sequence_parallel=False) == 1
    cfg = sft_config(root, "dataset.dataset_kwargs={pad_seq_to_mult: 8}")
    train, _, _ = datasets(cfg)
    assert train.collate_fn(samples)["tokens"].shape[1] % 8 == 0
    cfg = sft_config(root, "dataset.dataset_kwargs={pad_to_max_length: true}")
    train, _, _ = datasets(cfg)
    assert train.collate_fn(samples)["tokens"].shape == (4, 32)


def test_samples_repeat_over_seeded_epochs(tmp_path):
    root = make_root(tmp_path, n=10)
    train, _, _ = datasets(sft_config(root), counts=(25, 0, 0))
    assert len(train) == 25
    order = [train.order(i) for i in range(25)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # reshuffled each epoch
    again, _, _ = datasets(sft_config(root), counts=(25, 0, 0))
    assert [again.order(i) for i in range(25)] == order
    capped, _, _ = datasets(sft_config(root, "dataset.max_train_samples=4"), counts=(8, 0, 0))
    assert len(capped.examples) == 4


def test_batch_loader_resumes_at_consumed_samples(tmp_path):
    cfg = sft_config(make_root(tmp_path), "dataset.dataloader_type=batch")
    cfg.validate(world_size=1)
    tok = build_tokenizer(cfg.tokenizer)

    def batches(consumed: int, n: int) -> list[dict[str, torch.Tensor]]:
        it, _, _ = build_train_valid_test_data_iterators(
            cfg,
            tok,
            dp_rank=0,
            dp_size=1,
            consumed_train_samples=consumed,
            consumed_valid_samples=0,
            train_samples=40,
            valid_samples=0,
            test_samples=0,
        )
        return [next(it) for _ in range(n)]

    straight = batches(0, 6)
    resumed = batches(12, 3)  # 3 micro-batches of 4 consumed
    for a, b in zip(straight[3:], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lengths = {b["tokens"].shape[1] for b in straight}
    assert len(lengths) > 1  # padded to each micro-batch's longest, not to seq_length
    assert isinstance(PretrainingSampler(40, 12, 4, 0, 1), PretrainingSampler)


# ------------------------------------------------------------------------------ packing


def test_first_fit_shuffle_fills_bins_and_is_seeded():
    lengths = [5, 3, 7, 2, 8, 1, 4, 6]
    bins = first_fit_shuffle(lengths, 10, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) <= 5 and bins == first_fit_shuffle(lengths, 10, seed=3)


def test_packed_sample_positions_mask_and_boundaries(tmp_path):
    exs, _ = examples_of([{"input": "ab", "output": "c"}, {"input": "d", "output": "ef"}], tmp_path)
    packs = pack_examples(exs, 12, seed=0, pad_id=TOK.pad, answer_only_loss=True)
    assert packs.shape == (1, 4, 12)
    s = packed_sample(packs[0])
    seg = packs[0, 3]
    n0 = int((seg == 0).sum())
    n1 = int((seg == 1).sum())
    assert s["position_ids"].tolist()[: n0 + n1] == [*range(n0), *range(n1)]
    first = exs[packs_order(exs, packs)]
    assert s["tokens"][:n0].tolist() == first.ids[:-1].tolist()
    assert s["labels"][:n0].tolist() == first.ids[1:].tolist()  # labels stay inside the example
    assert s["loss_mask"][n0 + n1 :].eq(0).all()
    mask = s["attention_mask"][0]
    assert mask.shape == (12, 12)
    assert not mask[n0, n0] and mask[n0, n0 - 1]  # example 2 cannot see example 1
    assert not mask[n0 - 1, 0] and mask[0, 1]  # causal inside an example
    assert (~mask).any(dim=1).all()  # no fully masked row (padding sees itself)


def packs_order(exs, packs) -> int:
    """Which example went first into the pack."""
    n0 = int((packs[0, 3] == 0).sum())
    return next(i for i, e in enumerate(exs) if len(e) - 1 == n0 and packs[0, 0, 0] == e.ids[0])


def _losses(model, batch) -> torch.Tensor:
    per_token = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    return (per_token.float() * batch["loss_mask"]).sum()


def test_packed_and_padded_batches_give_the_same_loss(tmp_path):
    torch.manual_seed(0)
    root = make_root(tmp_path, n=12)
    cfg = sft_config(root, seq_length=64)
    cfg.model.vocab_size = TOK.vocab_size
    cfg.model.hidden_dropout = 0.0
    cfg.model.attention_dropout = 0.0
    model = cfg.model.provide().eval()
    train, _, _ = datasets(cfg, counts=(12, 0, 0))
    padded = train.collate_fn([train[i] for i in range(12)])
    packed_cfg = sft_config(root, "+dataset.packed_sequence_specs.packed_sequence_size=-1", seq_length=64)
    packed_train, _, _ = datasets(packed_cfg, counts=(12, 0, 0))
    packs = packed_train.packs
    assert len(packs) < 12  # they do pack
    from viaduct.data.loaders import collate_samples

    packed = collate_samples([packed_sample(p) for p in packs])
    with torch.no_grad():
        a, b = _losses(model, padded), _losses(model, packed)
    assert padded["loss_mask"].sum() == packed["loss_mask"].sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _packed(root: Path, *overrides: str, counts=(8, 4, 0)):
    cfg = sft_config(
        root, "+dataset.packed_sequence_specs.packed_sequence_size=-1", "dataset.do_test=false", *overrides
    )
    return cfg, datasets(cfg, counts)


def test_pack_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    root = make_root(tmp_path)
    cfg, (train, _, _) = _packed(root)
    npy, meta = pack_paths(cfg, build_tokenizer(cfg.tokenizer), "train", root, 32)
    assert npy.parent.parent == root / "packed" and npy.name == "train_32.npy" and meta.exists()
    stamp = npy.stat().st_mtime_ns, npy.stat().st_ino
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackCacheWarning)
        _, (train2, _, _) = _packed(root)
    assert (npy.stat().st_mtime_ns, npy.stat().st_ino) == stamp  # loaded, not rebuilt
    assert np.array_equal(train2.packs, train.packs)
    with open(root / "training.jsonl", "a") as f:
        f.write(json.dumps({"input": "new", "output": "record"}) + "\n")
    with pytest.warns(PackCacheWarning, match="stale"):
        _, (train3, _, _) = _packed(root)
    assert int((train3.packs[:, 3] >= 0).sum()) > int((train.packs[:, 3] >= 0).sum())


class _Opens:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _consistent_metadata(npy: Path, meta: Path) -> None:
    from viaduct.data.sft.packing import file_sha256

    info = json.loads(meta.read_text())
    info["sha256"] = file_sha256(npy)
    meta.write_text(json.dumps(info))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickled", "bad_ids", "metadata"])
def test_damaged_pack_cache_is_rebuilt_never_loaded(tmp_path, damage):
    root = make_root(tmp_path)
    cfg, (train, _, _) = _packed(root)
    npy, meta = pack_paths(cfg, build_tokenizer(cfg.tokenizer), "train", root, 32)
    good = train.packs.copy()
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "garbage":
        npy.write_bytes(os.urandom(npy.stat().st_size))
    elif damage == "pickled":
        # Unpickling this object array would create `marker`: the cache must never be unpickled.
        np.save(npy, np.array([_Opens(tmp_path / "marker")], dtype=object), allow_pickle=True)
        _consistent_metadata(npy, meta)
    elif damage == "bad_ids":
        bad = good.copy()
        bad[0, 0, 0] = 10**6
        np.save(npy, bad)
        _consistent_metadata(npy, meta)  # a matching checksum: the content check must catch it
    else:
        meta.write_text("{not json")
    with pytest.warns(PackCacheWarning, match="rebuilding"):
        _, (again, _, _) = _packed(root)
    assert np.array_equal(again.packs, good)
    assert not (tmp_path / "marker").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackCacheWarning)
        _packed(root)  # the rebuilt cache is valid


def test_explicit_pack_paths_are_used(tmp_path):
    root = make_root(tmp_path)
    out = tmp_path / "elsewhere"
    _packed(
        root,
        f"dataset.packed_sequence_specs.packed_train_data_path={out}/t.npy",
        f"dataset.packed_sequence_specs.packed_val_data_path={out}/v.npy",
        f"dataset.packed_sequence_specs.packed_metadata_path={out}/meta.json",
        "dataset.packed_sequence_specs.tokenizer_model_name=bytes",
    )
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "t.npy", "v.json", "v.npy"]
    assert not (root / "packed").exists() or not list((root / "packed").rglob("train_*.npy"))


# ------------------------------------------------------------------------------ config rules


def _problems(cfg) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        cfg.validate(world_size=1)
    return {p.path: f"{p.message} | {p.fix}" for p in exc.value.problems}


def test_config_problems_are_reported_together_with_paths(tmp_path):
    cfg = sft_config(
        tmp_path / "missing",
        "dataset.dataset_kwargs={prompt_templte: x, prompt_template: '{input}', truncation_method: middle}",
        "+dataset.packed_sequence_specs.packed_sequence_size=0",
        "dataset.packed_sequence_specs.pad_cu_seqlens=true",
    )
    got = _problems(cfg)
    assert "does not exist" in got["dataset.dataset_root"]
    assert "did you mean prompt_template" in got["dataset.dataset_kwargs.prompt_templte"]
    assert "{output}" in got["dataset.dataset_kwargs.prompt_template"]
    assert "right" in got["dataset.dataset_kwargs.truncation_method"]
    assert "must be >= 1" in got["dataset.packed_sequence_specs.packed_sequence_size"]
    assert "pad_cu_seqlens=false" in got["dataset.packed_sequence_specs.pad_cu_seqlens"]


def test_missing_split_files_follow_do_validation_and_do_test(tmp_path):
    root = make_root(tmp_path)
    (root / "validation.jsonl").unlink()
    (root / "test.jsonl").unlink()
    got = _problems(sft_config(root))
    assert "validation.jsonl" in got["dataset.dataset_root"] or "test.jsonl" in got["dataset.dataset_root"]
    sft_config(root, "dataset.do_validation=false", "dataset.do_test=false").validate(world_size=1)
    (root / "training.jsonl").unlink()
    got = _problems(sft_config(root, "dataset.do_validation=false", "dataset.do_test=false"))
    assert "training.jsonl" in got["dataset.dataset_root"]


def test_unsafe_template_placeholders_are_refused(tmp_path):
    got = _problems(
        sft_config(
            make_root(tmp_path), "dataset.dataset_kwargs={prompt_template: '{input.__class__} {output}'}"
        )
    )
    assert "not a plain {key}" in got["dataset.dataset_kwargs.prompt_template"]


def test_batch_dataloader_is_refused_for_gpt_datasets_only(tmp_path):
    cfg = tiny_pretrain_config("dataset.dataloader_type=batch")
    got = _problems(cfg)
    assert "batch is not supported yet" in got["dataset.dataloader_type"]
    assert FinetuningDatasetConfig().dataloader_type == "batch"
    sft_config(make_root(tmp_path), "dataset.dataloader_type=batch").validate(world_size=1)


def test_pipeline_parallelism_refuses_variable_length_batches(tmp_path):
    root = make_root(tmp_path)
    pp = ("model.pipeline_model_parallel_size=2",)
    got = _problems(sft_config(root, *pp))
    assert "pad_to_max_length=true" in got["dataset.dataset_kwargs.pad_to_max_length"]
    for fix in (
        "dataset.dataset_kwargs={pad_to_max_length: true}",
        "+dataset.packed_sequence_specs.pad_seq_to_mult=1",
    ):
        cfg = sft_config(root, *pp, fix)
        with pytest.raises(ConfigError) as exc:
            cfg.validate(world_size=1)
        assert "dataset.dataset_kwargs.pad_to_max_length" not in {p.path for p in exc.value.problems}


def test_seq_length_follows_the_model_and_packed_size_is_bounded(tmp_path):
    root = make_root(tmp_path)
    cfg = sft_config(root, seq_length=48)
    cfg.validate(world_size=1)
    assert cfg.dataset.seq_length == 48
    got = _problems(sft_config(root, "+dataset.packed_sequence_specs.packed_sequence_size=64", seq_length=48))
    assert "at most 48" in got["dataset.packed_sequence_specs.packed_sequence_size"]
    assert PackedSequenceSpecs().packed_sequence_size == -1


def test_builtin_example_builds_three_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("VIADUCT_CACHE", str(tmp_path / "cache"))
    cfg = sft_config(Path("builtin:pydoc-sft"), seq_length=128)
    train, valid, test = datasets(cfg)
    assert len(train.examples) > 500 and len(valid.examples) > 10 and len(test.examples) > 10
    got = _problems(sft_config(Path("builtin:pydoc-stf")))
    assert "did you mean pydoc-sft" in got["dataset.dataset_root"]


def test_pack_pad_seq_to_mult_rounds_each_example_slot(tmp_path):
    exs, _ = examples_of([{"input": "ab", "output": "c"}, {"input": "defg", "output": "hi"}], tmp_path)
    packs = pack_examples(exs, 16, seed=0, pad_id=TOK.pad, answer_only_loss=True, pad_seq_to_mult=4)
    seg = packs[0, 3]
    assert [int((seg == k).sum()) for k in (0, 1)] in ([4, 8], [8, 4])  # 4 and 7 positions rounded up
    s = packed_sample(packs[0])
    assert s["loss_mask"].sum() == sum(int(e.answer[1:].sum()) for e in exs)  # slot padding has no loss


def test_tokenizing_in_several_threads_gives_the_same_examples(tmp_path):
    recs = [{"input": f"question {i}", "output": f"answer {i * 7}"} for i in range(2500)]  # 3 chunks
    options = SFTOptions()
    records = RecordReader(options, None).read(write_jsonl(tmp_path / "many.jsonl", recs))
    one, _ = build_examples(records, TOK, options, 64, workers=1)
    three, _ = build_examples(records, TOK, options, 64, workers=3)
    assert len(one) == len(three) == 2500
    assert all(
        np.array_equal(a.ids, b.ids) and np.array_equal(a.answer, b.answer) for a, b in zip(one, three)
    )
