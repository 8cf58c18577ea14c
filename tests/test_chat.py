"""The chat engine: reply assembly (stop strings, UTF-8, whitespace), token choice, prompt trimming and
the KV-cache decoding loop, on the real GPT-NeoX-20B tokenizer and a real tiny random model."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from chatkit.chat import ChatEngine, GenerationParams, ReplyAssembler, _next_token, _stop_holdback
from chatkit.conversation import Message
from chatkit.templates import get_template
from chatkit.tokenization import encode_prompt

OCK = get_template("openchatkit")
STOP = "<human>:"
NO_STOP = dataclasses.replace(OCK, stop_strings=())


def U(text: str) -> Message:
    return Message("user", text)


def A(text: str) -> Message:
    return Message("assistant", text)


def S(text: str) -> Message:
    return Message("system", text)


def feed(tokenizer, chunks: list[str], template=OCK):
    """Push the tokens of each chunk (encoded separately) one by one.

    Returns the assembler, the pieces, and after each chunk the text shown so far.
    """
    asm = ReplyAssembler(tokenizer, template)
    pieces, shown_after = [], []
    for chunk in chunks:
        for tok in tokenizer.encode(chunk, add_special_tokens=False):
            if asm.stopped:
                break
            piece = asm.push(tok)
            if piece:
                pieces.append(piece)
        shown_after.append("".join(pieces))
    tail = asm.finish()
    if tail:
        pieces.append(tail)
    return asm, pieces, shown_after


# --- ReplyAssembler on the 20B tokenizer ----------------------------------------------------------


def test_pieces_join_to_reply(neox_tokenizer):
    asm, pieces, _ = feed(neox_tokenizer, [" Hello there, how", " are you today?"])
    assert asm.reply == "Hello there, how are you today?"
    assert "".join(pieces) == asm.reply
    assert len(pieces) > 1  # it really streams
    assert not asm.stopped


def test_leading_space_head_is_dropped(neox_tokenizer):
    asm, pieces, _ = feed(neox_tokenizer, [" hi"])
    assert asm.reply == "hi" == "".join(pieces)
    assert OCK.reply_text(" hi") == "hi"
    # Without the head nothing is removed.
    asm, pieces, _ = feed(neox_tokenizer, ["hi"])
    assert asm.reply == "hi" == "".join(pieces)


def test_stop_string_cuts_reply_and_sets_stopped(neox_tokenizer):
    asm, pieces, _ = feed(neox_tokenizer, [" Sure thing.\n<human>: and now", " more"])
    assert asm.stopped
    assert asm.reply == "Sure thing."
    assert "".join(pieces) == "Sure thing."
    assert not any("<" in p or "\n" in p for p in pieces)


def test_stop_string_split_across_tokens(neox_tokenizer):
    # "<human>:" is three 20B tokens: "<", "human", ">:"; none of them may be shown.
    assert len(neox_tokenizer.encode(STOP, add_special_tokens=False)) > 1
    asm, pieces, shown = feed(neox_tokenizer, [" ok", " <", "human", ">:", " ignored"])
    assert asm.stopped and asm.reply == "ok"
    assert shown == ["ok", "ok", "ok", "ok", "ok"]


def test_held_back_prefix_is_shown_once_it_is_not_a_stop(neox_tokenizer):
    asm, pieces, shown = feed(neox_tokenizer, [" a <hu", "x"])
    # After " a <hu" only "a" is certain: " <hu" could still become " <human>:".
    assert shown[0] == "a"
    assert shown[1] == "a <hux"
    assert asm.reply == "a <hux" == "".join(pieces)
    assert not asm.stopped


@pytest.mark.parametrize(
    "chunks",
    [
        [" a <hu", "x"],
        [" x<", "h", "u", "m", "a", "n", ">", "!"],
        [" a\n", "<", "hum", "an>:", " b"],
        [" <<human>:"],
        [" one < two <h", "uman >: three"],
        [" tail <hum"],
    ],
)
def test_no_piece_shows_what_is_not_in_the_reply(neox_tokenizer, chunks):
    """Every intermediate shown text is a prefix of the final reply: nothing is ever taken back."""
    asm = ReplyAssembler(neox_tokenizer, OCK)
    shown = ""
    for chunk in chunks:
        for tok in neox_tokenizer.encode(chunk, add_special_tokens=False):
            if asm.stopped:
                break
            shown += asm.push(tok)
            final_text = "".join(chunks)
            final = OCK.reply_text(final_text.split(STOP)[0].rstrip() if STOP in final_text else final_text)
            assert final.startswith(shown), (shown, final)
    shown += asm.finish()
    assert shown == asm.reply


def test_trailing_newline_before_stop_is_not_in_reply(neox_tokenizer):
    asm, pieces, shown = feed(neox_tokenizer, [" done\n", "\n", "<human>:"])
    assert asm.reply == "done"
    assert shown == ["done", "done", "done"]  # the newlines were never shown
    assert "".join(pieces) == "done"


def test_inner_whitespace_is_shown_once_followed_by_text(neox_tokenizer):
    asm, pieces, shown = feed(neox_tokenizer, [" line one\n", "line two"])
    assert shown[0] == "line one"
    assert asm.reply == "line one\nline two" == "".join(pieces)


def test_trailing_whitespace_at_end_of_generation_is_kept(neox_tokenizer):
    # Generation ended without a stop string: finish() flushes everything, pieces still join to reply.
    asm, pieces, shown = feed(neox_tokenizer, [" ok\n"])
    assert shown == ["ok"]
    assert asm.reply == "ok\n" == "".join(pieces)


@pytest.mark.parametrize("text", [" 😀 中文 🇯🇵", " naïve café — 日本語のテキスト 🎉🎉", " 龘𠀋"])
def test_multibyte_utf8_never_yields_replacement_char(neox_tokenizer, text):
    ids = neox_tokenizer.encode(text, add_special_tokens=False)
    # The test only means something when some prefix really ends inside a character.
    partial = [neox_tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any("\ufffd" in p for p in partial)
    asm = ReplyAssembler(neox_tokenizer, OCK)
    pieces = [asm.push(t) for t in ids] + [asm.finish()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text[1:] == asm.reply


@pytest.mark.parametrize("text", [" 日本", " ok 😀", " café"])
def test_a_character_cut_off_by_the_end_of_generation_is_never_shown(bpe_tokenizer, text):
    """Generation that ends (max tokens, eos, Ctrl-C) inside a character leaves bytes that never
    formed one: they stay held back, in the pieces as in the reply, never shown as U+FFFD."""
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    cut = ids[:-1]
    assert bpe_tokenizer.decode(cut).endswith("\ufffd")  # the last character is incomplete
    complete = text[:-1]  # the characters that were whole
    for template in (OCK, None):
        asm = ReplyAssembler(bpe_tokenizer, template)
        pieces = [asm.push(t) for t in cut] + [asm.finish()]
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == asm.reply == (OCK.reply_text(complete) if template else complete)


def test_bytes_that_form_no_character_are_not_held_back_to_the_end(bpe_tokenizer):
    """A model can emit bytes no character is made of (a random one does). More of them than an
    unfinished character has are shown as the tokenizer decodes them, as they come, not held back."""
    lone = bpe_tokenizer.encode(" é", add_special_tokens=False)[-1]  # é's second byte, alone
    assert bpe_tokenizer.decode([lone]) == "\ufffd"
    ids = bpe_tokenizer.encode(" ok", add_special_tokens=False) + [lone] * 8
    asm = ReplyAssembler(bpe_tokenizer, None)
    pieces = [asm.push(t) for t in ids]
    assert "\ufffd" in "".join(pieces)  # shown while generating
    assert "".join(pieces) + asm.finish() == bpe_tokenizer.decode(ids) == " ok" + "\ufffd" * 8


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("abc<hu", ["<human>:"], 3),
        ("abc<", ["<human>:"], 1),
        ("abc<human>", ["<human>:"], 7),
        ("abc<human>:", ["<human>:"], 0),  # a whole stop string is found, not held back
        ("abc", ["<human>:"], 0),
        ("abc h", ["<human>:"], 0),
        ("", ["<human>:"], 0),
        ("<h", ["<human>:"], 2),
        ("x<b", ["<human>:", "<bot>:"], 2),
        ("x<", ["<human>:", "<bot>:"], 1),
        ("x<hu", ["<human>:", "human"], 3),
        ("x hum", ["<human>:", "human"], 3),
        ("anything", [], 0),
        ("ab", ["a"], 0),  # one-character stops are never partial
        ("<<hu", ["<human>:"], 3),
    ],
)
def test_stop_holdback(text, stops, expected):
    assert _stop_holdback(text, stops) == expected


# --- choosing the next token ----------------------------------------------------------------------


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(500, generator=g)


def _draws(logits, params, seed, n=30):
    g = torch.Generator().manual_seed(seed)
    return [_next_token(logits, params, g) for _ in range(n)]


def test_greedy_is_argmax(logits):
    top = int(logits.argmax())
    assert _next_token(logits, GenerationParams(sample=False), None) == top
    assert _next_token(logits, GenerationParams(sample=True, temperature=0.0), None) == top


def test_top_k_one_is_argmax(logits):
    p = GenerationParams(sample=True, temperature=5.0, top_k=1)
    assert set(_draws(logits, p, seed=0)) == {int(logits.argmax())}


def test_top_k_limits_the_candidates(logits):
    p = GenerationParams(sample=True, temperature=10.0, top_k=5, top_p=1.0)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    draws = _draws(logits, p, seed=1, n=200)
    assert set(draws) <= top5
    assert len(set(draws)) > 1


def test_small_top_p_is_argmax(logits):
    p = GenerationParams(sample=True, temperature=5.0, top_k=0, top_p=0.001)
    assert set(_draws(logits, p, seed=2)) == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = GenerationParams(sample=True, temperature=1.0, top_k=0, top_p=0.7)
    draws = _draws(logits, p, seed=3, n=300)
    assert set(draws) == {0, 1}


def test_seeded_sampling_is_reproducible(logits):
    p = GenerationParams(sample=True, temperature=1.5, top_k=0)
    a, b = _draws(logits, p, seed=7), _draws(logits, p, seed=7)
    assert a == b
    assert a != _draws(logits, p, seed=8)
    assert len(set(a)) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    p = GenerationParams(sample=True, temperature=1.0, top_k=0)
    draws = _draws(logits, p, seed=4, n=3000)
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.6, 0.3, 0.1], abs=0.04)


def test_low_temperature_sharpens():
    logits = torch.log(torch.tensor([0.6, 0.4]))
    cold = _draws(logits, GenerationParams(sample=True, temperature=0.05, top_k=0), seed=5, n=300)
    assert cold.count(0) / len(cold) > 0.99


# --- ChatEngine on the tiny random model ----------------------------------------------------------


class ForwardRecorder:
    """Records the input ids of every forward call (a hook that observes, never changes, the model)."""

    def __init__(self, model):
        self.calls: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(ids[0].tolist())

    def close(self):
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


GREEDY = GenerationParams(max_new_tokens=12, sample=False)
CHAT = [U("What is 2 + 3?")]


def test_engine_knows_template_context_and_eos(tiny_engine: ChatEngine):
    assert tiny_engine.template.name == "openchatkit"
    assert tiny_engine.context_length == 512
    assert tiny_engine.tokenizer.eos_token_id in tiny_engine.eos_ids
    assert tiny_engine.device.type == "cpu"


def test_greedy_reply_is_deterministic_and_equals_stream(tiny_engine: ChatEngine):
    a = tiny_engine.reply(CHAT, GREEDY)
    b = tiny_engine.reply(CHAT, GREEDY)
    pieces = list(tiny_engine.stream(CHAT, GREEDY))
    assert a == b == "".join(pieces)
    assert a  # a random model still says something within 12 tokens
    assert all(pieces)  # no empty pieces are yielded


def test_seeded_sampled_reply_is_reproducible(tiny_engine: ChatEngine):
    p = GenerationParams(max_new_tokens=10, sample=True, temperature=1.0, top_k=0)
    a = tiny_engine.reply(CHAT, p, seed=11)
    assert a == tiny_engine.reply(CHAT, p, seed=11)
    others = {tiny_engine.reply(CHAT, p, seed=s) for s in (12, 13, 14)}
    assert others - {a}


@pytest.mark.parametrize("max_new", [1, 4, 9])
def test_never_more_than_max_new_tokens(tiny_engine: ChatEngine, max_new: int):
    for seed in (0, 1):
        p = GenerationParams(max_new_tokens=max_new, sample=True, temperature=1.0, top_k=0)
        with ForwardRecorder(tiny_engine.model) as rec:
            tiny_engine.reply(CHAT, p, seed=seed)
        # One forward per generated token, each after the first feeding exactly one token.
        assert 1 <= len(rec.calls) <= max_new
        assert all(len(c) == 1 for c in rec.calls[1:])


def test_generation_passes_the_cache_as_transformers_wants_it(tiny_engine: ChatEngine, caplog):
    """transformers 5.24 renamed `past_key_values` to `cache`: the old name printed a FutureWarning
    (and a deprecation line) before every chat's first reply. Same tokens, no warning."""
    import logging
    import warnings

    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error")
        pieces = list(tiny_engine.stream(CHAT, GREEDY))
    assert pieces and not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_the_cache_argument_follows_the_models_forward():
    """A forward that names its cache argument is called with that name (older transformers:
    past_key_values); one that takes **kwargs (a PEFT wrapper) gets the installed version's name."""
    from chatkit.chat import _cache_argument

    assert _cache_argument({"past_key_values": None, "use_cache": None}) == "past_key_values"
    assert _cache_argument({"cache": None, "use_cache": None}) == "cache"
    assert _cache_argument({"kwargs": None}) == "cache"  # transformers 5.24 is installed


def test_loading_a_model_shows_no_progress_bar(tiny_model_dir, capfd):
    """A chat's model loads without transformers' "Loading weights" bar; the setting is restored."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    ChatEngine.from_pretrained(tiny_model_dir, device="cpu")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert hf_logging.is_progress_bar_enabled()


def test_prompt_ids_equal_encode_prompt(tiny_engine: ChatEngine):
    msgs = [S("Be brief."), U("Hi, my name is Zoe."), A("Nice to meet you, Zoe!"), U("What is my name?")]
    ids = tiny_engine.prompt_ids(msgs, 16)
    assert ids == encode_prompt(tiny_engine.tokenizer, OCK, msgs)
    assert tiny_engine.tokenizer.decode(ids).endswith("<human>: What is my name?\n<bot>:")
    # The first forward call sees exactly that prompt.
    with ForwardRecorder(tiny_engine.model) as rec:
        tiny_engine.reply(msgs, GenerationParams(max_new_tokens=2, sample=False))
    assert rec.calls[0] == ids


def test_raw_prompt_is_the_rendered_text(tiny_engine: ChatEngine):
    msgs = [U("hi"), A("hello"), U("again")]
    eos = tiny_engine.tokenizer.eos_token
    text = tiny_engine.raw_prompt(msgs)
    assert text == OCK.render(msgs, eos, eos, add_generation_prompt=True)
    assert text.startswith("<human>: hi\n<bot>: hello") and text.endswith("\n<human>: again\n<bot>:")


def test_raw_prompt_ends_with_the_generation_prompt_only_when_a_user_turn_awaits(tiny_engine: ChatEngine):
    msgs = [U("hi"), A("hello")]
    eos = tiny_engine.tokenizer.eos_token
    assert tiny_engine.raw_prompt(msgs) == OCK.render(msgs, eos, eos)  # no `<bot>:` after the reply
    awaiting = [*msgs, U("again")]
    assert tiny_engine.raw_prompt(awaiting) == tiny_engine.tokenizer.decode(
        tiny_engine.prompt_ids(awaiting, 8)
    )


def _long_history(turns: int) -> list[Message]:
    msgs = [S("You are a calculator.")]
    for i in range(turns):
        msgs += [U(f"What is {i} + {i + 10}? (turn {i})"), A(str(2 * i + 10))]
    return [*msgs, U("And the last question: what is 7 + 8?")]


def test_history_is_trimmed_to_fit(tiny_engine: ChatEngine):
    tok, max_new = tiny_engine.tokenizer, 400
    msgs = _long_history(30)
    assert len(encode_prompt(tok, OCK, msgs)) + max_new > tiny_engine.context_length
    ids = tiny_engine.prompt_ids(msgs, max_new)
    assert len(ids) + max_new <= tiny_engine.context_length
    text = tok.decode(ids)
    assert text.startswith("You are a calculator.\n")  # the system prompt is kept
    assert text.endswith("<human>: And the last question: what is 7 + 8?\n<bot>:")  # the last turn too
    assert "(turn 0)" not in text  # the oldest turns went
    # Exactly the oldest whole turns were dropped: the longest suffix of whole turns that fits.
    user_starts = [i for i, m in enumerate(msgs) if m.role == "user"]
    fitting = [
        s
        for s in user_starts
        if len(encode_prompt(tok, OCK, [msgs[0], *msgs[s:]])) + max_new <= tiny_engine.context_length
    ]
    best = min(fitting)
    assert best > 1 and ids == encode_prompt(tok, OCK, [msgs[0], *msgs[best:]])


def test_history_without_system_prompt_is_trimmed(tiny_engine: ChatEngine):
    msgs = _long_history(30)[1:]
    ids = tiny_engine.prompt_ids(msgs, 400)
    text = tiny_engine.tokenizer.decode(ids)
    assert len(ids) + 400 <= 512
    assert text.startswith("<human>: ")
    assert text.endswith("what is 7 + 8?\n<bot>:")


def test_history_that_fits_is_untouched(tiny_engine: ChatEngine):
    msgs = _long_history(2)
    assert tiny_engine.prompt_ids(msgs, 16) == encode_prompt(tiny_engine.tokenizer, OCK, msgs)


def test_trimmed_history_still_generates(tiny_engine: ChatEngine):
    msgs = _long_history(40)  # longer than the whole context by itself
    assert len(encode_prompt(tiny_engine.tokenizer, OCK, msgs)) > 512
    p = GenerationParams(max_new_tokens=6, sample=False)
    with ForwardRecorder(tiny_engine.model) as rec:
        tiny_engine.reply(msgs, p)
    assert len(rec.calls[0]) + 6 <= 512


def test_single_turn_that_cannot_fit_raises(tiny_engine: ChatEngine):
    huge = U("word " * 600)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_engine.prompt_ids([S("sys"), huge], 16)
    with pytest.raises(ValueError, match="context of 512"):
        tiny_engine.prompt_ids([U("a"), A("b"), huge], 16)
    with pytest.raises(ValueError):
        tiny_engine.reply([huge], GenerationParams(max_new_tokens=4, sample=False))
    # A short turn that only fails because of max_new_tokens raises too.
    with pytest.raises(ValueError):
        tiny_engine.prompt_ids([U("hi")], 512)


def _hf_greedy(engine: ChatEngine, ids: list[int], n: int) -> list[int]:
    out = engine.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def test_greedy_tokens_match_hf_generate(tiny_engine: ChatEngine):
    """The engine's KV-cache loop chooses exactly the tokens transformers' generate() does."""
    n = 12
    engine = ChatEngine(tiny_engine.model, tiny_engine.tokenizer, NO_STOP, tiny_engine.device)
    ids = engine.prompt_ids(CHAT, n)
    ref = _hf_greedy(engine, ids, n)
    if any(t in engine.eos_ids for t in ref):  # a stop-free comparison needs an eos-free continuation
        ref = ref[: next(i for i, t in enumerate(ref) if t in engine.eos_ids)]
    with ForwardRecorder(engine.model) as rec:
        reply = engine.reply(CHAT, GenerationParams(max_new_tokens=n, sample=False))
    # Call k>0 feeds the token chosen at step k-1: the chosen tokens except the last one.
    fed = [c[0] for c in rec.calls[1:]]
    assert rec.calls[0] == ids
    assert fed == ref[: len(fed)]
    assert len(fed) == len(ref) - 1
    # Bytes of a character that generation ended inside never become text (U+FFFD in decode's).
    assert reply == NO_STOP.reply_text(engine.tokenizer.decode(ref).rstrip("\ufffd"))


def test_greedy_text_matches_hf_generate_longer(tiny_engine: ChatEngine):
    n = 40
    msgs = [S("Be brief."), U("Hi, my name is Zoe."), A("Nice to meet you, Zoe!"), U("What is my name?")]
    ids = tiny_engine.prompt_ids(msgs, n)
    ref = _hf_greedy(tiny_engine, ids, n)
    eos = [i for i, t in enumerate(ref) if t in tiny_engine.eos_ids]
    ref = ref[: eos[0]] if eos else ref
    text = tiny_engine.tokenizer.decode(ref)
    if not eos:  # cut by max_new_tokens: the engine drops a last character whose bytes are incomplete
        text = text.rstrip("\ufffd")
    reply = tiny_engine.reply(msgs, GenerationParams(max_new_tokens=n, sample=False))
    if STOP in text:
        assert reply == OCK.reply_text(text[: text.index(STOP)].rstrip())
    else:
        assert reply == OCK.reply_text(text)


def test_stop_string_ends_generation_early(tiny_engine: ChatEngine):
    """A stop string taken from the model's own greedy output cuts the reply there and stops decoding."""
    n = 16
    full = ChatEngine(tiny_engine.model, tiny_engine.tokenizer, NO_STOP, tiny_engine.device)
    text = " " + full.reply(CHAT, GenerationParams(max_new_tokens=n, sample=False))
    # Pick two printable characters well inside the reply, first occurring there.
    stop = next(
        text[i : i + 2]
        for i in range(4, len(text) - 2)
        if text[i : i + 2].isprintable()
        and "\ufffd" not in text[i : i + 2]
        and text.find(text[i : i + 2]) == i
    )
    cut = text.index(stop)
    engine = ChatEngine(
        tiny_engine.model, tiny_engine.tokenizer, dataclasses.replace(OCK, stop_strings=(stop,)), full.device
    )
    p = GenerationParams(max_new_tokens=n, sample=False)
    with ForwardRecorder(engine.model) as rec:
        pieces = list(engine.stream(CHAT, p))
    assert "".join(pieces) == NO_STOP.reply_text(text[:cut].rstrip())
    assert len(rec.calls) < n
    assert not any(stop in p for p in pieces)


def test_eos_token_ends_generation(tiny_engine: ChatEngine):
    """Treating the 6th greedy token as eos ends the reply right before it."""
    n = 12
    engine = ChatEngine(tiny_engine.model, tiny_engine.tokenizer, NO_STOP, tiny_engine.device)
    ref = _hf_greedy(engine, engine.prompt_ids(CHAT, n), n)
    k = 5
    assert ref[k] not in ref[:k]  # so the first occurrence is at k
    engine.eos_ids = {ref[k]}
    with ForwardRecorder(engine.model) as rec:
        reply = engine.reply(CHAT, GenerationParams(max_new_tokens=n, sample=False))
    assert len(rec.calls) == k + 1
    assert reply == NO_STOP.reply_text(engine.tokenizer.decode(ref[:k]))


def test_from_pretrained_reads_template_and_rejects_missing_meta(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chatkit.json").unlink()
    with pytest.raises(ValueError, match="chatkit.json"):
        ChatEngine.from_pretrained(bare, device="cpu")
    engine = ChatEngine.from_pretrained(bare, template="openchatkit", device="cpu")
    assert engine.template is OCK
    assert next(engine.model.parameters()).dtype == torch.float32


def test_token_sync_decides_every_token_and_when_to_stop(tiny_engine):
    """Training samples under ZeRO-3 with token_sync = "take rank 0's token": whatever this process's
    logits say, the reply is the synced tokens and ends where they end (here at eos), on every rank."""
    from chatkit.chat import ChatEngine, GenerationParams
    from chatkit.conversation import Message

    tok = tiny_engine.tokenizer
    script = iter([*tok.encode(" 12", add_special_tokens=False), tok.eos_token_id])
    seen: list[int] = []

    def rank0_token(mine: int) -> int:
        seen.append(mine)
        return next(script)

    synced = ChatEngine(
        tiny_engine.model, tok, tiny_engine.template, tiny_engine.device, token_sync=rank0_token
    )
    params = GenerationParams(max_new_tokens=20, sample=False)
    assert synced.reply([Message("user", "What is 5 + 7?")], params) == "12"
    assert len(seen) == len(tok.encode(" 12", add_special_tokens=False)) + 1  # stopped at the synced eos


@pytest.mark.parametrize("turns", [0, 2, 20, 30, 40])
@pytest.mark.parametrize("system", [True, False])
def test_prompt_messages_are_what_prompt_ids_encodes(tiny_engine: ChatEngine, turns: int, system: bool):
    msgs = _long_history(turns)[0 if system else 1 :]
    for max_new in (4, 200):
        kept = tiny_engine.prompt_messages(msgs, max_new)
        assert encode_prompt(tiny_engine.tokenizer, OCK, kept) == tiny_engine.prompt_ids(msgs, max_new)
        # The system prompt (if any) and a suffix of whole turns, starting with a user turn.
        head = msgs[:1] if system else []
        assert kept[: len(head)] == head and kept[len(head)].role == "user"
        assert kept[len(head) :] == msgs[len(msgs) - len(kept) + len(head) :]
    assert tiny_engine.prompt_messages(_long_history(2), 16) == _long_history(2)  # fits: all kept
    assert len(tiny_engine.prompt_messages(_long_history(40), 4)) < len(_long_history(40))
    with pytest.raises(ValueError, match="does not fit the model's context of 512"):
        tiny_engine.prompt_messages([S("sys"), U("a"), A("b"), U("word " * 600)], 16)


def _folder(root, *files: str):
    """A folder holding these (empty) files, made under root."""
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


def test_a_model_path_that_is_not_a_model_folder_says_what_it_is(tmp_path, tiny_model_dir):
    """One line naming the path and what to do; never "no chatkit.json" for a folder that does not
    exist, nor a hub lookup ("Repo id must be in the form"), nor a traceback from an empty tokenizer."""
    from chatkit.chat import ModelFolderError

    run = tmp_path / "outputs" / "x"
    ckpt = _folder(run / "checkpoints", "latest", "step9/mp_rank_00_model_states.pt", "step9/config.json")
    no_tok = _folder(tmp_path / "no_tok", "config.json", "model.safetensors", "chatkit.json")
    (tmp_path / "file.txt").write_text("")
    cases = {
        tmp_path / "missing": "no such folder",
        tmp_path / "file.txt": "a file, not a model folder",
        ckpt: f"convert it first: python tools/convert_to_hf.py --checkpoint {ckpt} --out {run / 'hf'}",
        ckpt / "step9": f"--checkpoint {ckpt / 'step9'} --out {run / 'hf'}",
        run: f"a training run's folder without an export; make one: python tools/convert_to_hf.py "
        f"--checkpoint {ckpt} --out {run / 'hf'}",
        tmp_path: "no config.json",
        no_tok: "no tokenizer files (one of tokenizer.json, tokenizer.model",
    }
    for path, says in cases.items():
        with pytest.raises(ModelFolderError) as e:
            ChatEngine.from_pretrained(path, template="openchatkit", device="cpu")
        assert str(e.value).startswith(f"{path}: ") and says in str(e.value), (path, str(e.value))
        assert "\n" not in str(e.value)
    _folder(run / "hf", "config.json")
    with pytest.raises(
        ModelFolderError, match=re.escape(f"a training run's folder; its export is {run / 'hf'}")
    ):
        ChatEngine.from_pretrained(run, device="cpu")
    with pytest.raises(ModelFolderError, match="no such folder"):
        ChatEngine.from_pretrained("EleutherAI/pythia-70m", device="cpu")  # never a hub id
    ChatEngine.from_pretrained(tiny_model_dir, device="cpu")  # a real export loads
