"""A LLaMA-style sentencepiece model trained here, saved as Meta ships it and as a hub folder.

LLaMA's tokenizer is a sentencepiece BPE model trained with byte fallback, split digits, no whitespace
normalization and a dummy prefix (Touvron et al. 2023, §2.1; its trainer_spec, read from the released
tokenizer.model: model_type BPE, byte_fallback, split_digits, remove_extra_whitespaces false,
add_dummy_prefix, allow_whitespace_only_pieces, normalization identity). The model built here has those
settings and a vocabulary large enough (8,000 pieces) for pieces of several "▁" and "▁" + word, so the
tokenizations where sentencepiece and Hugging Face BPE front ends can disagree (runs of spaces, text
after special tokens) are exercised. Built once per test session (functools.cache).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALPACA_FILE = SHARED / "alpaca_en_demo.json"

# Texts with runs of spaces, tabs, newlines, digits, non-Latin scripts and emoji (code, tables).
WHITESPACE_TEXTS = [
    "def f(x):\n    return x  # two  spaces\n        deeper\n\tand a tab",
    "| name  | value   |\n|-------|---------|\n| a     | 12345   |\n| bb    |   7     |",
    "  leading spaces,  two inner,   three,    four\tand\ttabs\n\nnew lines  \n trailing  ",
    "Numbers 2023-05-27, 3.14159 and 1,000,000; emoji 👋🙂 and 你好，世界 and Привет мир and مرحبا",
]


def alpaca_rows() -> list[dict]:
    return json.loads(ALPACA_FILE.read_text(encoding="utf-8"))


def _corpus() -> list[str]:
    lines: list[str] = []
    for row in alpaca_rows():
        for key in ("instruction", "input", "output"):
            lines += [line for line in row[key].split("\n") if line]
    for text in WHITESPACE_TEXTS:
        lines += [line for line in text.split("\n") if line] * 40
    return lines


@functools.cache
def spm_model_bytes(vocab_size: int = 8000) -> bytes:
    """The serialized sentencepiece model (LLaMA's trainer settings)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "llama")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            split_by_unicode_script=True,
            split_by_whitespace=True,
            character_coverage=0.99995,
            max_sentence_length=4192,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return Path(prefix + ".model").read_bytes()


def processor():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=spm_model_bytes())


WHITESPACE_SCORE = -1e9


@functools.cache
def llama_layout_bytes() -> bytes:
    """`spm_model_bytes()` with the real Llama tokenizer.model's layout of whitespace-only pieces.

    In Meta's tokenizer.model the pieces of 2-16 spaces are normal pieces with early ids ("▁▁" is 259, the
    first id after the 256 byte pieces; "▁▁▁▁" 268, "▁"*8 308, "▁"*16 462) but merge last in sentencepiece:
    `encode("  Hello")` is [259, 15043] ('▁▁','▁Hello', llama.cpp issue #2721) and ",  two" is '▁','▁two',
    which needs "▁▁" to score below every word piece. So here they move right after the byte pieces with
    score -1e9 (ids no longer follow scores); sentencepiece's trainer options cannot produce this
    (`user_defined_symbols` would make them user-defined pieces, matched whole and never merged).
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model_bytes())
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    pieces = [sentencepiece_model_pb2.ModelProto.SentencePiece() for _ in proto.pieces]
    for new, old in zip(pieces, proto.pieces, strict=True):
        new.CopyFrom(old)
    spaces = [p for p in pieces if p.type == normal and len(p.piece) > 1 and set(p.piece) == {"▁"}]
    for p in spaces:
        p.score = WHITESPACE_SCORE
    others = [p for p in pieces if p not in spaces]
    first = next(i for i, p in enumerate(others) if p.type == normal)
    del proto.pieces[:]
    proto.pieces.extend(others[:first] + spaces + others[first:])
    return proto.SerializeToString()


def space_run_texts(longest: int = 40) -> list[str]:
    """Runs of 1..`longest` spaces at the start, between words, before punctuation, digits, tabs, newlines,
    non-Latin text and emoji, and at the end."""
    contexts = ("{}", "a{}b", ",{}two", "x{}", "\t{}\t", "{}\n{}", "12{}34", "你好{}世界", "🦙{}🙂")
    return [c.replace("{}", " " * n) for n in range(1, longest + 1) for c in contexts]


# Llama-2's published tokenizer settings (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json,
# special_tokens_map.json): sentencepiece's <s>/</s>/<unk>, bos added, legacy false, no pad token.
def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}  # fmt: skip


LLAMA2_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": _added("<s>"),
    "clean_up_tokenization_spaces": False,
    "eos_token": _added("</s>"),
    "legacy": False,
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": _added("<unk>"),
}
LLAMA2_SPECIAL_TOKENS_MAP = {
    "bos_token": {k: v for k, v in _added("<s>").items() if k != "__type"},
    "eos_token": {k: v for k, v in _added("</s>").items() if k != "__type"},
    "unk_token": {k: v for k, v in _added("<unk>").items() if k != "__type"},
}


def write_meta_tokenizer(folder: Path, model_bytes: bytes | None = None) -> Path:
    """tokenizer.model as in Meta's download (beside the model folders); `spm_model_bytes()` by default."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(spm_model_bytes() if model_bytes is None else model_bytes)
    return path


def write_hub_tokenizer(folder: Path) -> Path:
    """The tokenizer files of a Llama-2 hub repository: tokenizer.model plus its published settings."""
    write_meta_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(LLAMA2_SPECIAL_TOKENS_MAP, indent=2))
    return folder


def sp_encode_pieces(sp, text: str, specials: tuple[str, ...] = ("<s>", "</s>")) -> list[int]:
    """sentencepiece's ids for text that carries special tokens as text, as Meta's code encodes it:
    each special token is its id, each piece between them is `sp.encode(piece)` on its own (so each
    piece gets sentencepiece's dummy-prefix "▁", as Meta's chat_completion, which encodes every
    exchange separately, and OpenAlpaca, which encodes prompt and reply separately, have it)."""
    import re

    ids: list[int] = []
    for part in re.split("(" + "|".join(re.escape(s) for s in specials) + ")", text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += sp.encode(part)
    return ids
