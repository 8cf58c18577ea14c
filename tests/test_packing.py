"""Packing, mixing and the tokenized-data cache (chatkit.data)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import chatkit.data
from chatkit.conversation import ConversationError, Message
from chatkit.data import (
    Batches,
    DataSource,
    block_causal_mask,
    collate_rows,
    epoch_order,
    fit_conversation,
    pack_best_fit,
    tokenize_file,
)
from chatkit.templates import get_template
from chatkit.tokenization import IGNORE_INDEX, Encoded, encode_conversation

OCK = get_template("openchatkit")
_REAL_CHUNK = chatkit.data._tokenize_chunk  # before any test replaces it


def test_data_source_parses_weights():
    assert DataSource.parse("a/b.jsonl:0.25") == DataSource("a/b.jsonl", 0.25)
    assert DataSource.parse("a/b.jsonl") == DataSource("a/b.jsonl", None)
    assert DataSource.parse("c:/x/y.jsonl") == DataSource(
        "c:/x/y.jsonl", None
    )  # not a number: part of the path


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_places_every_item_once_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    rows = pack_best_fit(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # best fit decreasing is within 11/9 OPT + 1 rows; OPT >= total/capacity
    assert len(rows) <= 11 / 9 * (sum(lengths) / 128) + 2


def test_best_fit_known_case():
    # decreasing: 6 -> new row; 5 -> new row; 4 -> fits row0 (rest 4) exactly; 3 -> row1 (rest 5 -> 2); 2 -> row1
    assert pack_best_fit([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_best_fit([11], 10)


def test_collate_rows_positions_segments_and_labels():
    a = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Encoded([8, 9], [8, 9])  # a first token marked trained is still not a target
    batch = collate_rows([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    seg = batch["segment_ids"].tolist()
    assert seg[0] == [0, 0, 0, 1, 1] and seg[1][:2] == [0, 0] and len(set(seg[1][2:])) == 3
    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert ((mask[1, 0] == 0).sum(-1) > 0).all()  # every padding row attends to something (no NaN)


def _tiny(arch: str, attn: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=256)  # fmt: skip
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)  # fmt: skip
        model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.eval()


def _loss_sum(model, batch):
    from chatkit.train.loss import token_loss_sum

    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    ).logits
    return token_loss_sum(logits, batch["labels"]), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(arch, attn):
    model = _tiny(arch, attn)
    rng = random.Random(1)
    examples = []
    for _ in range(12):
        n = rng.randint(4, 40)
        ids = [rng.randrange(2, 200) for _ in range(n)]
        labels = [t if k > n // 3 else IGNORE_INDEX for k, t in enumerate(ids)]
        examples.append(Encoded(ids, labels))
    with torch.no_grad():
        plain = [_loss_sum(model, collate_rows([[e]], pad_id=0)) for e in examples]
        plain_loss = sum(s for s, _ in plain) / sum(c for _, c in plain)
        rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
        assert len(rows) < len(examples)  # several conversations share rows
        packed_sum, packed_count = _loss_sum(model, collate_rows([[examples[i] for i in r] for r in rows], 0))
        packed_loss = packed_sum / packed_count
        # padded (unpacked) batch through the same path
        pad_sum, pad_count = _loss_sum(model, collate_rows([[e] for e in examples], 0))
    assert packed_count == sum(c for _, c in plain) == pad_count
    assert abs(float(packed_loss) - float(plain_loss)) < 1e-5
    assert abs(float(pad_sum / pad_count) - float(plain_loss)) < 1e-5


def _pairs(order: tuple) -> list[tuple[int, int]]:
    files, items = order
    return list(zip(files.tolist(), items.tolist(), strict=True))


def test_epoch_order_without_weights_is_each_example_once():
    order = _pairs(epoch_order([3, 5], None, seed=0, epoch=0))
    assert sorted(order) == [(0, j) for j in range(3)] + [(1, j) for j in range(5)]
    assert _pairs(epoch_order([3, 5], None, 0, 0)) == order
    assert _pairs(epoch_order([3, 5], None, 0, 1)) != order
    assert _pairs(epoch_order([3, 5], None, 1, 0)) != order


def test_epoch_order_honours_weights():
    order = _pairs(epoch_order([100, 1000], [3.0, 1.0], seed=0, epoch=0))
    counts = Counter(f for f, _ in order)
    assert len(order) == 1100
    assert counts[0] == 825 and counts[1] == 275  # 3:1 whatever the sizes
    per_example = Counter(j for f, j in order if f == 0)
    assert max(per_example.values()) - min(per_example.values()) <= 1  # over-sampled evenly


def _write(path: Path, convs: list[list[Message]]) -> Path:
    path.write_text("".join(json.dumps({"messages": [m.to_dict() for m in c]}) + "\n" for c in convs))
    return path


def _convs(n: int, seed: int = 0) -> list[list[Message]]:
    from chatkit.datasets.synthetic import make_splits

    train, _ = make_splits(n, 0, seed)
    return [list(c.messages) for c in train]


def test_ranks_get_disjoint_batches_covering_the_epoch(bpe_tokenizer, tmp_path):
    ts = tokenize_file(
        str(_write(tmp_path / "d.jsonl", _convs(64))), bpe_tokenizer, OCK, 128, cache_dir=tmp_path
    )
    assert len(ts) == 64
    seen = []
    for rank in (0, 1):
        b = Batches([ts], None, 2, 128, False, rank, 2, seed=0, pad_id=1)
        stream = b.stream()
        for _ in range(b.steps_per_epoch(1)):
            _, batch = next(stream)
            seen += [tuple(r[r != 1].tolist()) for r in batch["input_ids"]]
    assert sorted(seen) == sorted(
        tuple(ts.example(i).input_ids) for i in range(len(ts))
    )  # each once, no overlap


def test_a_step_reads_the_same_rows_however_the_global_batch_is_split(bpe_tokenizer, tmp_path):
    """Step N reads rows N*G..(N+1)*G of the epoch's plan (G = micro-batch x ranks x accumulation), and
    an epoch ends after its last whole step: a run resumed on other ranks with the same G (chatkit.train.
    universal) reads, step after step and across epochs, the rows the interrupted run would have read."""
    ts = tokenize_file(
        str(_write(tmp_path / "d.jsonl", _convs(70))), bpe_tokenizer, OCK, 128, cache_dir=tmp_path
    )

    def steps(mbs: int, world: int, acc: int, skip_steps: int = 0, n: int = 30) -> list[list[tuple]]:
        streams = [
            Batches([ts], None, mbs, 128, False, r, world, seed=0, pad_id=1).stream(skip_steps * acc, acc)
            for r in range(world)
        ]
        out = []
        for _ in range(n):
            rows = []
            for _ in range(acc):
                for stream in streams:
                    rows += [tuple(r[r != 1].tolist()) for r in next(stream)[1]["input_ids"]]
            out.append(sorted(rows))
        return out

    two_ranks = steps(3, 2, 1)  # 30 steps of 6 rows: 11 per epoch of 70, 4 rows left over each epoch
    assert steps(2, 3, 1) == two_ranks
    assert steps(3, 1, 2) == two_ranks
    assert steps(1, 2, 3) == two_ranks
    assert steps(2, 3, 1, skip_steps=13, n=17) == two_ranks[13:]  # resumed mid-epoch on 3 ranks


def test_tokenize_file_multiprocess_equals_single_and_is_cached(bpe_tokenizer, tmp_path):
    src = _write(tmp_path / "d.jsonl", _convs(1200))
    one = tokenize_file(str(src), bpe_tokenizer, OCK, 128, num_proc=1, cache_dir=tmp_path / "c1")
    two = tokenize_file(str(src), bpe_tokenizer, OCK, 128, num_proc=2, cache_dir=tmp_path / "c2")
    assert (
        (one.tokens == two.tokens).all()
        and (one.offsets == two.offsets).all()
        and (one.trained == two.trained).all()
    )
    assert len(one) == 1200 and one.stats["ok"] == 1200
    first = _convs(1)[0]
    assert one.example(0) == encode_conversation(bpe_tokenizer, OCK, first)
    entries = list((tmp_path / "c1").glob("d-*"))
    assert len(entries) == 1
    again = tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path / "c1")
    assert (again.tokens == one.tokens).all() and len(list((tmp_path / "c1").glob("d-*"))) == 1
    # a changed source, length or template makes a new cache entry
    tokenize_file(str(src), bpe_tokenizer, OCK, 64, cache_dir=tmp_path / "c1")
    _write(src, _convs(10, seed=5))
    tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path / "c1")
    assert len(list((tmp_path / "c1").glob("d-*"))) == 3


def test_overlong_drop_or_truncate_by_whole_turns(bpe_tokenizer):
    conv = [Message("user", "What is 1 + 1?"), Message("assistant", "2"),
            Message("user", "word " * 80), Message("assistant", "ok")]  # fmt: skip
    full = len(encode_conversation(bpe_tokenizer, OCK, conv).input_ids)
    first = encode_conversation(bpe_tokenizer, OCK, conv[:2])
    assert fit_conversation(bpe_tokenizer, OCK, conv, full, "drop")[1] == "ok"
    assert fit_conversation(bpe_tokenizer, OCK, conv, full - 1, "drop") == (None, "too_long")
    enc, outcome = fit_conversation(bpe_tokenizer, OCK, conv, full - 1, "truncate")
    assert outcome == "truncated" and enc == first
    assert fit_conversation(bpe_tokenizer, OCK, conv, len(first.input_ids) - 1, "truncate") == (
        None,
        "too_long",
    )
    untrained = [Message("user", "hi"), Message("assistant", "yo", train=False)]
    assert fit_conversation(bpe_tokenizer, OCK, untrained, 100, "drop") == (None, "untrained")


def test_tokenize_counts_every_outcome(bpe_tokenizer, tmp_path):
    convs = _convs(20) + [
        [Message("user", "x " * 300), Message("assistant", "y")],
        [Message("user", "hi"), Message("assistant", "  ")],
        [Message("user", "hi"), Message("assistant", "no", train=False)],
    ]
    ts = tokenize_file(str(_write(tmp_path / "d.jsonl", convs)), bpe_tokenizer, OCK, 100, cache_dir=tmp_path)
    assert ts.stats == {"ok": 20, "truncated": 0, "too_long": 1, "untrained": 1, "empty_message": 1}
    assert len(ts) == 20
    from chatkit.data import describe

    assert "1 over 100 tokens, 1 with nothing trained and 1 with an empty message" in describe("d", ts, 100)


@pytest.mark.parametrize("procs", [1, 2])
def test_bad_line_names_file_and_line_even_in_workers(bpe_tokenizer, tmp_path, procs):
    src = _write(tmp_path / "d.jsonl", _convs(600))
    lines = src.read_text().splitlines()
    lines[550] = '{"messages": [{"role": "bot", "content": "x"}]}'
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConversationError, match=r"d\.jsonl:551: messages\[0\]\.role"):
        tokenize_file(str(src), bpe_tokenizer, OCK, 128, num_proc=procs, cache_dir=tmp_path)


def test_a_damaged_cache_entry_is_tokenized_again(bpe_tokenizer, tmp_path, caplog_loguru):
    src = _write(tmp_path / "d.jsonl", _convs(20))
    first = tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path / "c")
    first = type(first)(
        np.array(first.tokens), first.trained, np.array(first.offsets)
    )  # off the file damaged next
    (entry,) = (tmp_path / "c").glob("d-*")
    tokens = entry / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])  # a full disk, a hand edit
    again = tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path / "c")
    assert (again.tokens == first.tokens).all() and (again.offsets == first.offsets).all()
    assert any("damaged tokenization cache entry" in m for m in caplog_loguru)
    tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path / "c")  # and the new entry reads


def test_a_line_that_is_not_utf8_is_named(bpe_tokenizer, tmp_path):
    src = _write(tmp_path / "d.jsonl", _convs(3))
    src.write_bytes(src.read_bytes() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(ConversationError, match=r"d\.jsonl:4: not UTF-8 \(byte 0xe9 at column 47\)"):
        tokenize_file(str(src), bpe_tokenizer, OCK, 128, cache_dir=tmp_path)


def test_an_oversized_message_is_never_tokenized(bpe_tokenizer, monkeypatch):
    """A row far longer than max_length tokens could ever hold is judged by its length alone: the
    tokenizer never sees it (a 50 MB row once grew a worker to 20 GB)."""
    import chatkit.data as data

    seen: list[int] = []
    real = data.encode_conversation

    def spy(tokenizer, template, messages, tools=None):
        seen.append(max(len(m.content) for m in messages))
        return real(tokenizer, template, messages, tools)

    monkeypatch.setattr(data, "encode_conversation", spy)
    huge = "word " * 400_000  # 2 MB
    conv = [
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", huge),
        Message("assistant", "ok"),
    ]
    assert fit_conversation(bpe_tokenizer, OCK, conv, 128, "drop") == (None, "too_long")
    enc, outcome = fit_conversation(bpe_tokenizer, OCK, conv, 128, "truncate")
    assert (
        outcome == "truncated"
        and enc.input_ids == encode_conversation(bpe_tokenizer, OCK, conv[:2]).input_ids
    )
    assert fit_conversation(
        bpe_tokenizer, OCK, [Message("user", huge), Message("assistant", "x")], 128, "truncate"
    ) == (
        None,
        "too_long",
    )
    assert seen and max(seen) < 100  # only the short prefix was ever encoded


def _dies_on_the_second_chunk(args):
    """A tokenizer worker killed from outside (as the OOM killer would) on the chunk from line 9."""
    import os

    if args[1] > 1:
        os._exit(137)
    return _REAL_CHUNK(args)


def test_a_dead_tokenizer_worker_stops_the_run_naming_the_lines(bpe_tokenizer, tmp_path, monkeypatch):
    """The OOM killer ends a worker: the run stops with a message instead of waiting forever."""
    import chatkit.data as data

    monkeypatch.setattr(data, "_tokenize_chunk", _dies_on_the_second_chunk)  # forked workers inherit it
    monkeypatch.setattr(data, "CHUNK", 8)
    src = _write(tmp_path / "d.jsonl", _convs(40))
    with pytest.raises(ConversationError, match=r"d\.jsonl:\d+-\d+: a tokenizer process died") as died:
        tokenize_file(str(src), bpe_tokenizer, OCK, 128, num_proc=2, cache_dir=tmp_path)
    first, last = map(int, re.search(r"jsonl:(\d+)-(\d+):", str(died.value)).groups())
    assert first <= 9 and 16 <= last <= 40  # the lines in flight when it died, its chunk among them
    assert not list(tmp_path.glob("d-*"))  # and no cache entry
