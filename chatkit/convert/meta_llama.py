"""Meta's original LLaMA / Llama-2 downloads (params.json, consolidated.NN.pth, tokenizer.model) -> Hugging Face.

The conversion is the one transformers' `convert_llama_weights_to_hf.py` does, streamed:

- Names: tok_embeddings -> model.embed_tokens, layers.i.attention.wq/wk/wv/wo -> self_attn.q/k/v/o_proj,
  feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj, attention_norm / ffn_norm -> input_layernorm /
  post_attention_layernorm, norm -> model.norm, output -> lm_head; `rope.freqs` is dropped (recomputed).
- Rotary: Meta rotates interleaved pairs of q/k rows (2i, 2i+1), Hugging Face rotates halves (i, i + d/2),
  so q and k rows are permuted head by head (`permute`), k with the kv-head count (GQA).
- Model-parallel shards (1 file for 7B, 2 for 13B, 8 for 70B) are Meta's Column/RowParallelLinear
  slices: wq/wk/wv/w1/w3 and output are joined on dim 0, wo/w2 on dim 1, the embedding on dim 1 for
  Llama-1/2 (ParallelEmbedding splits the width); norms are replicated and taken from shard 0.

Memory: each output tensor is a `TensorRef` whose `load()` slices its parts from the shard files, which
are opened with mmap (`torch_load_safe`) and dropped after every output shard (`on_shard_done`), so mapped
pages never add up to more than about one output shard plus the tensor being written.

The tokenizer is a fast tokenizer whose tokenizer.json reproduces sentencepiece's ids exactly (the legacy
Llama pipeline: prepend "▁", spaces to "▁"; no pre-tokenizer) and is saved as `PreTrainedTokenizerFast`:
transformers 5's `LlamaTokenizer` class would rebuild it with a Metaspace pre-tokenizer that drops the "▁"
after `<s>` ("<s>[INST]" would no longer give Meta's ids). It adds `<s>` like Meta's `encode(bos=True)`.
`chatkit.json` names the chat template chatkit uses for the model: `llama2` for Llama-2 (Meta's chat
format), `alpaca` for LLaMA-1 (the format of its best-known fine-tunes); `--template` at chat time overrides.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from chatkit.convert.weights import DTYPES, TensorRef, WeightsError, torch_load_safe, write_weights
from chatkit.io import atomic_dir, check_apart, write_json

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
VOCAB_TENSORS = frozenset({"tok_embeddings.weight", "output.weight"})
SKIPPED = frozenset({"rope.freqs"})  # recomputed by the model from rope_theta
CONTEXT_LENGTH = {1: 2048, 2: 4096}
CODE_LLAMA_CONTEXT = 16384  # rope_theta > 10000 marks Code Llama (transformers' converter does the same)
TEMPLATE_FOR_VERSION = {1: "alpaca", 2: "llama2"}
# (Hugging Face name in a layer, Meta name in a layer, dim the shards are joined on (None: replicated),
# rotary heads to permute: "q" (n_heads), "kv" (n_kv_heads) or None)
LAYER_MAP: tuple[tuple[str, str, int | None, str | None], ...] = (
    ("self_attn.q_proj.weight", "attention.wq.weight", 0, "q"),
    ("self_attn.k_proj.weight", "attention.wk.weight", 0, "kv"),
    ("self_attn.v_proj.weight", "attention.wv.weight", 0, None),
    ("self_attn.o_proj.weight", "attention.wo.weight", 1, None),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight", 0, None),
    ("mlp.up_proj.weight", "feed_forward.w3.weight", 0, None),
    ("mlp.down_proj.weight", "feed_forward.w2.weight", 1, None),
    ("input_layernorm.weight", "attention_norm.weight", None, None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", None, None),
)
# Strings the converted tokenizer must encode exactly as sentencepiece does (checked after building it).
TOKENIZER_PROBES = (
    "Hello world! How are you?",
    "  two leading spaces,  two inner\tand a tab\nnew line",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nNumbers 12345 and 3.14 [/INST]",
    "unicode: café naïve 🦙",
    # runs of 1-20 and 33 spaces after digits, words and punctuation (code, tables: Llama has pieces of 2-16)
    "".join(f"{i}" + " " * i for i in range(1, 21)) + "a" + " " * 33 + "b,  two   three.    ",
    "def f(x):\n    return x  # two  spaces\n        deeper\n\tand\t\ttabs \t mixed\n\n\n  ",
    "| name  | value   |\n|-------|---------|\n| a     | 12345   |\n| bb    |   7     |",
    "Dates 2023-05-27, pi 3.14159, 1,000,000 and 0x1F; 你好，世界  Привет мир  مرحبا  नमस्ते  日本語",
    "emoji 👋🙂🦙🇺🇸👩‍💻 and rare ꙮ ᚠ 𓀀 (byte fallback)",
)


# ---------------------------------------------------------------------------------------- inputs


def compute_intermediate_size(dim: int, ffn_dim_multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """The FFN width Meta's model.py derives: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(ffn_dim_multiplier * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class MetaParams:
    """params.json, with Meta's defaults filled in (n_kv_heads = n_heads, rope_theta 10000)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float
    multiple_of: int
    ffn_dim_multiplier: float
    vocab_size: int  # -1: the tokenizer's size

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def intermediate_size(self) -> int:
        return compute_intermediate_size(self.dim, self.ffn_dim_multiplier, self.multiple_of)


def read_params(input_dir: str | Path) -> MetaParams:
    """Read and check `params.json` (errors name the file)."""
    path = Path(input_dir) / PARAMS_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: not found ({input_dir} is not a Meta LLaMA download folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    raw = raw.get("model", raw) if isinstance(raw, dict) else raw
    missing = [
        k for k in ("dim", "n_layers", "n_heads", "norm_eps") if not isinstance(raw, dict) or k not in raw
    ]
    if missing:
        raise WeightsError(f"{path}: missing {', '.join(missing)}")
    p = MetaParams(
        dim=int(raw["dim"]),
        n_layers=int(raw["n_layers"]),
        n_heads=int(raw["n_heads"]),
        n_kv_heads=int(raw.get("n_kv_heads") or raw["n_heads"]),
        norm_eps=float(raw["norm_eps"]),
        rope_theta=float(raw.get("rope_theta") or 10000.0),
        multiple_of=int(raw.get("multiple_of") or 256),
        ffn_dim_multiplier=float(raw.get("ffn_dim_multiplier") or 1.0),
        vocab_size=int(raw.get("vocab_size", -1)),
    )
    if p.dim % p.n_heads or p.n_heads % p.n_kv_heads or p.head_dim % 2:
        raise WeightsError(f"{path}: dim {p.dim}, n_heads {p.n_heads}, n_kv_heads {p.n_kv_heads} do not fit")
    return p


def find_shards(input_dir: str | Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in rank order; a gap in the numbering is an error."""
    folder = Path(input_dir)
    found = {}
    for f in folder.glob("consolidated.*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        raise WeightsError(f"{folder}: no consolidated.*.pth checkpoint files")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise WeightsError(f"{folder}: model-parallel shard(s) missing: {', '.join(missing)}")
    return [found[i] for i in sorted(found)]


def find_tokenizer(input_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The sentencepiece model: `tokenizer` if given, else tokenizer.model in the folder or its parent
    (Meta's downloads keep one tokenizer.model beside the 7B/13B/70B folders)."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise WeightsError(f"{path}: tokenizer model not found")
        return path
    folder = Path(input_dir)
    candidates = [folder / TOKENIZER_FILE, folder.resolve().parent / TOKENIZER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsError(f"no tokenizer: neither {candidates[0]} nor {candidates[1]} exists (pass --tokenizer)")


# ---------------------------------------------------------------------------------------- weights


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's q/k rows from Meta's interleaved rotary pairs to Hugging Face's two halves."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch_load_safe(path)
    except Exception as e:  # unpickling errors come in many types; each means "not a readable checkpoint"
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
    return state


class MetaShards:
    """The model-parallel files, each mmapped when first needed and all dropped by `clear()`.

    Shapes and dtypes are read once up front; data pages are mapped only while a shard's dict is held,
    so calling `clear()` after each output shard keeps resident memory to what that shard touched.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self.meta: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = []
        for f in files:
            state = _load_shard(f)
            self.meta.append({k: (tuple(t.shape), t.dtype) for k, t in state.items()})
            del state

    def __len__(self) -> int:
        return len(self.files)

    def shape(self, rank: int, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if key not in self.meta[rank]:
            raise WeightsError(f"{self.files[rank]}: tensor {key!r} is missing")
        return self.meta[rank][key]

    def tensor(self, rank: int, key: str) -> torch.Tensor:
        if rank not in self._states:
            self._states[rank] = _load_shard(self.files[rank])
        return self._states[rank][key]

    def clear(self) -> None:
        self._states.clear()


def _joined_shape(shards: MetaShards, key: str, cat_dim: int | None) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape of `key` once its model-parallel parts are joined; parts that cannot join are an error."""
    parts = [shards.shape(r, key) for r in range(len(shards))]
    shape, dtype = parts[0]
    for r, (s, d) in enumerate(parts):
        ok = d == dtype and len(s) == len(shape)
        ok = ok and all(a == b for i, (a, b) in enumerate(zip(s, shape, strict=True)) if i != cat_dim)
        if not ok:
            raise WeightsError(
                f"{shards.files[r]}: {key} is {list(s)} {d}, but {shards.files[0].name} has {list(shape)} {dtype}"
            )
    if cat_dim is None or len(shards) == 1:
        return shape, dtype
    joined = list(shape)
    joined[cat_dim] = sum(s[cat_dim] for s, _ in parts)
    return tuple(joined), dtype


def _ref(shards: MetaShards, name: str, key: str, cat_dim: int | None, heads: int, expected) -> TensorRef:
    """A ref to HF tensor `name`, made from Meta tensor `key` (joined on `cat_dim`, rotary-permuted if heads)."""
    shape, dtype = _joined_shape(shards, key, cat_dim)
    if shape != tuple(expected):
        where = shards.files[0] if len(shards) == 1 else f"{shards.files[0].parent}/consolidated.*.pth"
        source = PARAMS_FILE + (" and the tokenizer's vocabulary" if key in VOCAB_TENSORS else "")
        raise WeightsError(
            f"{where}: {key} joins to shape {list(shape)}, but {source} give {list(expected)} for {name}"
        )

    def load() -> torch.Tensor:
        if cat_dim is None or len(shards) == 1:
            t = shards.tensor(0, key).clone()
        else:
            t = torch.cat([shards.tensor(r, key) for r in range(len(shards))], dim=cat_dim)
        return permute(t, heads) if heads else t

    return TensorRef(name, shape, dtype, load)


def _embedding_cat_dim(shards: MetaShards, dim: int) -> int:
    """Llama-1/2 split tok_embeddings on its width (dim 1); a vocab-split (dim 0) file is read as such."""
    shape, _ = shards.shape(0, "tok_embeddings.weight")
    return 1 if len(shards) > 1 and len(shape) == 2 and shape[1] != dim else 0


def meta_refs(shards: MetaShards, p: MetaParams, vocab_size: int) -> list[TensorRef]:
    """Refs to every Hugging Face tensor, in Hugging Face's order, checked against params and each other."""
    d, hd, inter = p.dim, p.head_dim, p.intermediate_size
    q_rows, kv_rows = p.n_heads * hd, p.n_kv_heads * hd
    shapes = {
        "attention.wq.weight": (q_rows, d), "attention.wk.weight": (kv_rows, d),
        "attention.wv.weight": (kv_rows, d), "attention.wo.weight": (d, q_rows),
        "feed_forward.w1.weight": (inter, d), "feed_forward.w3.weight": (inter, d),
        "feed_forward.w2.weight": (d, inter), "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
    }  # fmt: skip
    heads = {"q": p.n_heads, "kv": p.n_kv_heads, None: 0}
    refs = [
        _ref(shards, "model.embed_tokens.weight", "tok_embeddings.weight", _embedding_cat_dim(shards, d), 0,
             (vocab_size, d))
    ]  # fmt: skip
    for i in range(p.n_layers):
        for hf, meta, cat_dim, rot in LAYER_MAP:
            key = f"layers.{i}.{meta}"
            refs.append(_ref(shards, f"model.layers.{i}.{hf}", key, cat_dim, heads[rot], shapes[meta]))
    refs.append(_ref(shards, "model.norm.weight", "norm.weight", None, 0, (d,)))
    refs.append(_ref(shards, "lm_head.weight", "output.weight", 0, 0, (vocab_size, d)))
    _check_no_extra(shards, p)
    return refs


def _check_no_extra(shards: MetaShards, p: MetaParams) -> None:
    """A tensor the mapping does not know would be silently dropped: refuse instead."""
    known = {"tok_embeddings.weight", "norm.weight", "output.weight", *SKIPPED}
    known |= {f"layers.{i}.{meta}" for i in range(p.n_layers) for _, meta, _, _ in LAYER_MAP}
    for f, meta in zip(shards.files, shards.meta, strict=True):
        extra = sorted(set(meta) - known)
        if extra:
            raise WeightsError(
                f"{f}: tensors a LLaMA checkpoint with n_layers={p.n_layers} does not have: {extra[:5]}"
                + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            )


# ---------------------------------------------------------------------------------------- tokenizer


def _sentencepiece(model_file: Path):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise WeightsError(f"{model_file}: not a sentencepiece model ({e})") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise WeightsError(
            f"{model_file}: the sentencepiece model has no bos/eos pieces (LLaMA's has <s>, </s>)"
        )
    return sp


def build_tokenizer(model_file: str | Path, model_max_length: int, chat_template: str | None = None):
    """A fast tokenizer giving exactly sentencepiece's ids for `model_file` (checked on probe strings),
    adding `<s>` in front like Meta's `encode(bos=True)`; no pad token (LLaMA has none)."""
    import copy

    from tokenizers import normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    model_file = Path(model_file)
    sp = _sentencepiece(model_file)
    specials = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id())}
    if sp.unk_id() >= 0:
        specials["unk_token"] = sp.id_to_piece(sp.unk_id())
    # transformers sets the decoder and the bos post-processor; the BPE model is rebuilt with sentencepiece's
    # merge priority (`_bpe_model`) and the front end is replaced by sentencepiece's own (legacy) behaviour.
    kwargs = LlamaTokenizer.convert_to_native_format(vocab_file=str(model_file))
    base = LlamaTokenizer(**{**kwargs, **specials, "add_bos_token": True, "add_eos_token": False})
    backend = copy.deepcopy(base.backend_tokenizer)
    backend.model = _bpe_model(model_file, sp)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, chat_template=chat_template, **specials
    )
    _check_tokenizer(tok, sp, model_file)
    return tok


def bpe_merges(pieces: list[tuple[str, float, bool]]) -> list[tuple[str, str]]:
    """BPE merges in sentencepiece's priority order, from (piece, score, is_normal) listed by id.

    sentencepiece's BPE encoder repeatedly joins the adjacent pair whose joined piece has the highest score
    (the leftmost such pair on a tie); only normal pieces are ever formed. transformers' converter ranks merges
    by piece id instead, which is the same order only where ids follow scores: Llama's whitespace-only pieces
    ("▁▁" is id 259) come early in id order with the lowest score (-1e9), so that ranking joins "▁▁" before
    "▁two" where sentencepiece does the opposite (",  two": '▁▁','two' instead of '▁','▁two').
    Here every split of a normal piece into two normal pieces is a merge, ranked by the joined piece's score,
    then by the longer left part (on equal scores sentencepiece grows the leftmost symbol first: a run of
    spaces becomes "▁"*16 chunks from the left, as with Llama's sixteen space pieces), then by id.
    Equal scores are the one case merge ranks cannot always copy; `_check_tokenizer` refuses a result
    that differs on its probes.
    """
    normal = {piece: (score, i) for i, (piece, score, is_normal) in enumerate(pieces) if is_normal}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, -len(left), i, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _bpe_model(model_file: Path, sp):
    """The tokenizers BPE model for `model_file`: sentencepiece's ids, merges in its score order."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    pieces = [(p.piece, p.score, p.type == normal) for p in proto.pieces]
    return BPE(
        vocab={piece: i for i, (piece, _, _) in enumerate(pieces)},
        merges=bpe_merges(pieces),
        unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )


def _check_tokenizer(tok, sp, model_file: Path) -> None:
    """Refuse a fast tokenizer that would feed the model other ids than it was trained on."""
    if len(tok) != sp.get_piece_size():
        raise WeightsError(
            f"{model_file}: converted vocabulary has {len(tok)} tokens, not {sp.get_piece_size()}"
        )
    for text in TOKENIZER_PROBES:
        ids = tok(text)["input_ids"]
        want = [sp.bos_id(), *sp.encode(text)]
        if ids != want:
            raise WeightsError(
                f"{model_file}: the fast tokenizer encodes {text!r} as {ids}, sentencepiece as {want} "
                "(not a LLaMA-style BPE sentencepiece model?)"
            )


def save_tokenizer(tok, model_file: Path, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (class `PreTrainedTokenizerFast`, loaded verbatim) and a copy
    of the original tokenizer.model for tools that read sentencepiece (llama.cpp, Meta's code)."""
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(cfg_path, cfg)
    shutil.copyfile(model_file, out / TOKENIZER_FILE)


# ---------------------------------------------------------------------------------------- folder


def default_context(llama_version: int, rope_theta: float) -> int:
    """2048 for LLaMA-1, 4096 for Llama-2; 16384 for Code Llama (rope_theta > 10000)."""
    if llama_version not in CONTEXT_LENGTH:
        raise ValueError(f"llama_version {llama_version}: expected one of {sorted(CONTEXT_LENGTH)}")
    return CODE_LLAMA_CONTEXT if rope_theta > 10000.0 else CONTEXT_LENGTH[llama_version]


def llama_config(p: MetaParams, vocab_size: int, max_position_embeddings: int, dtype: torch.dtype, tok):
    """The `LlamaConfig` matching params.json (untied embeddings, bos/eos from the tokenizer)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.dim,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads,
        rms_norm_eps=p.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    return config


@dataclass(frozen=True)
class MetaConversion:
    """What `convert_meta_llama` wrote."""

    out: Path
    files: list[Path]
    tensors: int
    dtype: torch.dtype
    vocab_size: int
    template: str


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def convert_meta_llama(
    input_dir: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    llama_version: int = 2,
    max_position_embeddings: int | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
) -> MetaConversion:
    """Convert a Meta download folder into a Hugging Face `LlamaForCausalLM` folder at `out`.

    `dtype` ("fp16", "bf16", "fp32") casts the weights; None keeps the checkpoint's. Everything is checked
    (params, shards, tokenizer, every shape) before anything is written; `out` appears only when complete.
    """
    input_dir, out = Path(input_dir), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    params = read_params(input_dir)
    files = find_shards(input_dir)
    tok_path = find_tokenizer(input_dir, tokenizer)
    check_apart(out, {"the input": input_dir, "the tokenizer": tok_path}, WeightsError)
    context = max_position_embeddings or default_context(llama_version, params.rope_theta)
    template = TEMPLATE_FOR_VERSION[llama_version]
    tok = build_tokenizer(tok_path, context, _chat_template(template))
    vocab_size = params.vocab_size if params.vocab_size > 0 else len(tok)
    shards = MetaShards(files)
    refs = meta_refs(shards, params, vocab_size)
    cast = DTYPES[dtype] if dtype else None  # None: every tensor keeps its dtype
    out_dtype = cast or _main_dtype(refs)
    config = llama_config(params, vocab_size, context, out_dtype, tok)
    logger.info(f"{input_dir}: {len(files)} model-parallel shard(s), {len(refs)} tensors -> {out}")
    with atomic_dir(out) as tmp:
        written = write_weights(tmp, refs, max_shard_size, cast, progress, on_shard_done=shards.clear)
        shards.clear()
        _write_metadata(tmp, config, tok, tok_path, template, llama_version)
    return MetaConversion(out, [out / f.name for f in written], len(refs), out_dtype, vocab_size, template)


def _main_dtype(refs: list[TensorRef]) -> torch.dtype:
    """The dtype holding most of the weights (Meta's files use one: fp16 for LLaMA-1, bf16 for Llama-2)."""
    counts: dict[torch.dtype, int] = {}
    for r in refs:
        counts[r.dtype] = counts.get(r.dtype, 0) + r.numel
    return max(counts, key=lambda d: counts[d])


def _chat_template(name: str) -> str:
    from chatkit.templates import get_template

    return get_template(name).chat_template


def _write_metadata(tmp: Path, config, tok, tok_path: Path, template: str, llama_version: int) -> None:
    """config.json, generation_config.json (Meta's bos/eos), the tokenizer, chatkit.json."""
    from transformers import GenerationConfig

    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(tmp)
    save_tokenizer(tok, tok_path, tmp)
    meta = {"template": template, "source": "meta", "llama_version": llama_version}
    write_json(tmp / "chatkit.json", {**meta, "dtype": _dtype_name(config.dtype)})
