"""Preference training's data path and losses: records, pair tokenization, pair packing, and the
packed loss (and its gradients) equal to the loss of one pair per row and of separate rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from chatkit.config import ConfigError, load_config
from chatkit.conversation import ConversationError, Message, Preference, iter_preferences, parse_line
from chatkit.data import (
    Pair,
    block_causal_mask,
    collate_pairs,
    collate_rows,
    describe,
    fit_pair,
    pack_best_fit,
    tokenize_file,
)
from chatkit.templates import get_template
from chatkit.tokenization import IGNORE_INDEX, Encoded, encode_conversation
from chatkit.train.data import filler
from chatkit.train.loss import Output
from chatkit.train.preference import LOSSES, PreferenceLoss, preference_loss, sequence_logps

OCK = get_template("openchatkit")


def _record(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
        **extra,
    }


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("row", "error"),
    [
        (
            {"messages": [{"role": "user", "content": "q"}], "chosen": {"content": "a"}},
            r"field 'rejected' is missing",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            r"field .chosen. is missing .*method=sft",
        ),
        (_record("q", "a", "b") | {"chosen": "a"}, r"chosen: expected an object with 'content', got str"),
        (
            _record("q", "a", "b") | {"rejected": {"role": "user", "content": "b"}},
            r"rejected\.role: a reply must",
        ),
        (_record("q", "a", "b") | {"rejected": {"content": 3}}, r"rejected\.content: must be a string"),
        (
            _record("q", "a", "b") | {"chosen": {"content": "a", "train": True}},
            r"chosen: unknown field\(s\) train",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}
            | {"chosen": {"content": "a"}, "rejected": {"content": "b"}},
            r"messages\[1\]\.role: the prompt must end with a user message",
        ),
        (
            {"messages": [{"role": "user", "content": "q", "train": True}]}
            | {"chosen": {"content": "a"}, "rejected": {"content": "b"}},
            r"messages\[0\]\.train: not allowed in a preference record",
        ),
        (
            {
                "messages": [{"role": "robot", "content": "q"}],
                "chosen": {"content": "a"},
                "rejected": {"content": "b"},
            },
            r"messages\[0\]\.role: must be one of",
        ),  # fmt: skip
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, row, error):
    path = _write(tmp_path / "p.jsonl", [_record("fine", "a", "b"), row])
    with pytest.raises(ConversationError, match=rf"p\.jsonl:2: {error}"):
        list(iter_preferences(path))


def test_a_preference_record_given_as_a_conversation_says_which_method():
    with pytest.raises(ConversationError, match=r"x:3: a preference record .* method=dpo"):
        parse_line(json.dumps(_record("q", "a", "b")), "x:3")


def test_records_keep_system_prompts_and_multi_turn_prefixes(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": {"role": "assistant", "content": "4"},
        "rejected": {"content": "5"},
        "source": "t",
    }
    (p,) = iter_preferences(_write(tmp_path / "p.jsonl", [row]))
    assert [m.role for m in p.prompt] == ["system", "user", "assistant", "user"]
    chosen, rejected = p.sequences()
    assert [m.trained for m in chosen] == [False, False, False, False, True]  # only the reply is scored
    assert rejected[-1] == Message("assistant", "5", True)
    assert p.to_dict()["rejected"] == {"role": "assistant", "content": "5"}


# ---------------------------------------------------------------- tokenization


def test_a_pair_scores_only_its_reply_and_end_of_turn(bpe_tokenizer):
    pref = Preference((Message("user", "say hi"), Message("assistant", "hi"), Message("user", "again")),
                      Message("assistant", "hello there"), Message("assistant", "no"))  # fmt: skip
    pair, outcome = fit_pair(bpe_tokenizer, OCK, pref, 512)
    assert outcome == "ok"
    for enc, reply in ((pair.chosen, "hello there"), (pair.rejected, "no")):
        scored = [t for t in enc.labels if t != IGNORE_INDEX]
        text = bpe_tokenizer.decode(scored)
        assert text.strip() == reply + bpe_tokenizer.eos_token  # the reply and the trained stop token
        whole = encode_conversation(bpe_tokenizer, OCK, [*pref.prompt, Message("assistant", reply)])
        assert enc.input_ids == whole.input_ids  # the same ids as the conversation ending in that reply


def test_tokenizing_pairs_counts_every_outcome(bpe_tokenizer, tmp_path):
    rows = [_record(f"question {i}", f"answer {i}", f"other {i}") for i in range(10)]
    rows += [
        _record("q", "same", "same"),
        _record("q", "  ", "b"),
        _record("q", "word " * 200, "b"),
    ]
    ts = tokenize_file(str(_write(tmp_path / "p.jsonl", rows)), bpe_tokenizer, OCK, 100, cache_dir=tmp_path,
                       pairs=True)  # fmt: skip
    assert ts.stats == {"ok": 10, "too_long": 1, "untrained": 0, "empty_message": 1, "identical_replies": 1}
    assert len(ts) == 10 and len(ts.lengths) == 10
    pair = ts.example(3)
    assert isinstance(pair, Pair) and ts.lengths[3] == len(pair.chosen.input_ids) + len(
        pair.rejected.input_ids
    )
    assert "10 preference pairs kept" in describe("p", ts, 100)
    assert "1 with identical replies" in describe("p", ts, 100)
    # the same file as conversations is another cache entry, and says what it is
    with pytest.raises(ConversationError, match="method=dpo"):
        tokenize_file(str(tmp_path / "p.jsonl"), bpe_tokenizer, OCK, 100, cache_dir=tmp_path)


def test_collate_pairs_keeps_each_reply_a_document_of_its_own():
    a = Pair(
        Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([5, 6, 8, 9], [IGNORE_INDEX, 6, 8, 9]), -1.0, -2.0
    )
    b = Pair(Encoded([4, 4], [IGNORE_INDEX, 4]), Encoded([4, 3], [IGNORE_INDEX, 3]), -3.0, -4.0)
    batch = collate_pairs([[a, b], [b]], pad_id=0)
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5] + [-1] * 7]
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]
    assert batch["reference"].tolist() == [[-1.0, -2.0], [-3.0, -4.0], [-3.0, -4.0]]
    assert batch["pair_weight"].tolist() == [1.0, 1.0, 1.0]
    assert collate_pairs([[filler(a)]], 0)["pair_weight"].tolist() == [0.0]


# ---------------------------------------------------------------- losses: packed = unpacked


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


def _logits(model, batch):
    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    ).logits
    return Output(logits=logits)


def _pairs(n: int, seed: int = 1) -> list[Pair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(2, 200) for _ in range(rng.randint(3, 20))]
        seqs = []
        for _ in range(2):
            reply = [rng.randrange(2, 200) for _ in range(rng.randint(1, 15))]
            seqs.append(Encoded(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
        pairs.append(Pair(*seqs, -rng.uniform(20, 60), -rng.uniform(20, 60)))
    return pairs


def _loss_and_grads(model, batch, loss: PreferenceLoss):
    model.zero_grad()
    total, stats = preference_loss(loss, _logits(model, batch), batch)
    n = batch["pair_weight"].sum()
    (total / n).backward()
    return float(total.detach() / n), stats / n, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize(("arch", "attn"), [("gpt_neox", "sdpa"), ("gpt_neox", "eager"), ("llama", "sdpa")])
def test_packed_pairs_give_the_unpacked_loss_and_gradients(kind, arch, attn):
    model = _tiny(arch, attn)
    pairs = _pairs(9)
    loss = PreferenceLoss(kind, beta=0.5, simpo_gamma=0.3)
    rows = pack_best_fit([len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs], 96)
    assert len(rows) < len(pairs)  # several pairs share rows
    packed = _loss_and_grads(model, collate_pairs([[pairs[i] for i in r] for r in rows], 0), loss)
    one_per_row = _loss_and_grads(model, collate_pairs([[p] for p in pairs], 0), loss)
    assert packed[0] == pytest.approx(one_per_row[0], rel=1e-5, abs=1e-6)
    assert torch.allclose(packed[1], one_per_row[1], rtol=1e-5, atol=1e-5)
    for name, g in packed[2].items():
        assert torch.allclose(g, one_per_row[2][name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in packed[2].values())


def test_sequence_logps_equal_separate_rows():
    """Each reply's log-probability from a packed row equals the one computed on its own, unpadded row
    (the way TRL lays a batch out: chosen rows then rejected rows)."""
    model = _tiny("llama", "sdpa")
    pairs = _pairs(5, seed=4)
    with torch.no_grad():
        batch = collate_pairs([pairs], 0)
        logps, counts = sequence_logps(_logits(model, batch), batch)
        for k, p in enumerate(pairs):
            for side, enc in enumerate((p.chosen, p.rejected)):
                row = collate_rows([[enc]], 0)
                lp = torch.log_softmax(_logits(model, row).logits[0, :-1].float(), -1)
                targets = row["labels"][0, 1:]
                scored = targets != IGNORE_INDEX
                expected = lp[scored].gather(1, targets[scored, None]).sum()
                assert float(logps[2 * k + side]) == pytest.approx(float(expected), rel=1e-5)
                assert int(counts[2 * k + side]) == int(scored.sum())


def test_statistics_are_reward_accuracy_and_margin():
    """Rewards are beta * (policy - reference) log-ratios; with the policy equal to the reference they
    are 0 and no pair counts as won (TRL's strict comparison)."""
    model = _tiny("gpt_neox", "sdpa")
    pairs = _pairs(4, seed=2)
    with torch.no_grad():
        batch = collate_pairs([[p] for p in pairs], 0)
        logps, _ = sequence_logps(_logits(model, batch), batch)
        batch["reference"] = logps.double().view(-1, 2)
        total, stats = preference_loss(PreferenceLoss("sigmoid", 0.1), _logits(model, batch), batch)
    assert float(total) / 4 == pytest.approx(0.6931, abs=1e-4)  # -log sigmoid(0)
    assert stats[0] == 0 and abs(float(stats[1])) < 1e-5
    assert float(stats[4]) == pytest.approx(float(logps[0::2].sum()), rel=1e-6)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["method=rlhf"], "method: must be sft or dpo"),
        (["method=dpo", "preference_loss=kto"], "preference_loss: must be one of"),
        (["method=dpo", "beta=0"], "beta: must be positive"),
        (
            ["method=dpo", "pipeline_stages=2", "deepspeed=pipeline"],
            "preference training runs on the ZeRO engine",
        ),
    ],
)
def test_config_refuses_what_preference_training_cannot_do(tmp_path, overrides, error):
    train = _write(tmp_path / "p.jsonl", [_record("q", "a", "b")])
    with pytest.raises(ConfigError, match=error):
        load_config(None, [f"train_files=[{train}]", f"output_dir={tmp_path / 'o'}", *overrides])


# ---------------------------------------------------------------- evaluation, demo data, recipes


def test_evaluate_preferences_scores_each_reply_as_training_does(tiny_engine, tmp_path):
    from chatkit.evaluate import evaluate_preferences, pair_logps

    rows = [_record("What is 2 + 3?", "5", "6"), _record("Reverse the words: a b", "b a", "a b"),
            _record("Hi, my name is Zoe.", "Nice to meet you, Zoe!", "Hello Bob")]  # fmt: skip
    path = _write(tmp_path / "p.jsonl", rows)
    res = evaluate_preferences(tiny_engine, str(path))
    assert res.total == 3 and res.skipped == 0
    pairs = [fit_pair(tiny_engine.tokenizer, tiny_engine.template, p, 512)[0] for p in iter_preferences(path)]
    logps = pair_logps(tiny_engine, pairs)
    assert res.correct == int((logps[:, 0] > logps[:, 1]).sum())
    # each reply's score: its scored tokens' log-probabilities on a row of its own
    enc = pairs[0].chosen
    with torch.no_grad():
        lp = torch.log_softmax(tiny_engine.model(torch.tensor([enc.input_ids])).logits[0, :-1].float(), -1)
    expected = sum(float(lp[k - 1, t]) for k, t in enumerate(enc.labels) if t != IGNORE_INDEX and k > 0)
    assert float(logps[0, 0]) == pytest.approx(expected, rel=1e-5)
    same = evaluate_preferences(tiny_engine, str(path), reference=tiny_engine)
    assert same.correct == 0 and same.margin == 0  # a model is its own reference: every reward is 0


def test_demo_pairs_are_near_misses_of_unseen_prompts():
    from chatkit.datasets.synthetic import make_preference_pairs, make_splits, near_miss

    rng = random.Random(0)
    for answer in ["7", "85", "198", "4321", "Zoe", "blue fish red", "x"]:
        for _ in range(50):
            assert near_miss(answer, rng) != answer
    _, heldout = make_splits(0, 40)
    train, held = make_preference_pairs(400, heldout)
    assert len(train) == 400 and len(held) == 40
    held_prompts = {tuple(m.content for m in p.prompt) for p in held}
    assert not held_prompts & {tuple(m.content for m in p.prompt) for p in train}
    assert all(p.chosen.content != p.rejected.content for p in train + held)
    assert [m.content for m in held[0].prompt] == [m.content for m in heldout[0].messages[:-1]]


def test_a_recipe_export_names_its_recipe_base():
    from chatkit.models import spec_for_path

    assert spec_for_path("outputs/koala/hf").name == "llama-13b"
    assert spec_for_path("outputs/demo/hf").name == "tiny"
    assert spec_for_path("outputs/no-such-recipe/hf") is None


def test_dry_run_plans_the_reference_pass(capsys, monkeypatch):
    from chatkit import launch

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    launch.main(["config/koala-dpo.yaml", "--dry-run", "--num-gpus", "8"])
    out = capsys.readouterr().out
    assert "model: outputs/koala/hf, the export of a llama-13b run (llama), 13.02B parameters" in out
    assert "no second model (a frozen reference model would add 3.03 GiB per GPU)" in out
    launch.main(["config/koala-dpo.yaml", "--dry-run", "--num-gpus", "8", "preference_loss=simpo"])
    assert "reference-free: no reference pass" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "content", "error"),
    [
        ("--data", '{"messages": [{"role": "bot", "content": "x"}]}', r"bad\.jsonl:1: messages\[0\]\.role"),
        (
            "--pairs",
            '{"messages": [{"role": "user", "content": "x"}]}',
            r"bad\.jsonl:1: field 'chosen' is missing",
        ),
        ("--pairs", None, r"bad\.jsonl: no such file"),
    ],
)
def test_evaluate_tool_says_one_line_for_bad_data(tiny_model_dir, tmp_path, flag, content, error):
    import re
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content + "\n")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(tiny_model_dir), flag, str(bad)],
                       cwd=repo, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(rf"error: .*{error}.*\n", r.stderr), r.stderr
