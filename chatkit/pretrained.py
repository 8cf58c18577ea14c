"""Preparing base models in the layout the trainer reads: a Hugging Face folder, `pretrained/<name>/model`.

Two kinds: the tiny models are built here (`prepare_tiny`, tokenizer trained locally); the real ones
(`prepare_base`) are copied from the Hugging Face hub, or from a local copy of it, and re-written:
config.json, tokenizer (always with a tokenizer.json, and the registry template's chat_template
embedded), weights as safetensors (streamed tensor by tensor, optionally cast), `chatkit.json`.

That folder is all every engine needs. OpenChatKit also split the weights into per-layer files for
its pipeline trainer; chatkit's pipeline engine (`chatkit.train.pipeline_model.build_pipeline`) builds its
stages from the transformers model loaded from this folder, so there is no per-layer layout to make.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatkit.architectures import get_architecture
from chatkit.conversation import iter_jsonl
from chatkit.io import check_apart
from chatkit.models import ModelSpec, build_model, get_model_spec, save_base, train_tokenizer
from chatkit.templates import get_template
from chatkit.templates.base import TOOL_TEMPLATES

logger = logging.getLogger(__name__)


def _corpus_texts(paths: Sequence[str], template: str) -> Iterator[str]:
    tpl = get_template(template)
    # The template's literal pieces, so markers like "<human>:" become single tokens.
    yield tpl.render([], "", "")
    # (a family's template has no pieces: its markers are special tokens, and its renders below hold
    # the rest of its text)
    names = ("system", "user", "user_after_system", "assistant_prefix", "assistant", "separator")
    for piece in (getattr(tpl, name, None) or "" for name in names):
        yield piece.replace("{content}", " ").replace("{eos}", "").replace("{bos}", "")
    if not paths:
        from chatkit.datasets.synthetic import make_splits

        train, _ = make_splits(5000, 0)
        for conv in train:
            yield tpl.render(conv.messages, "", "")
        return
    for path in paths:
        if path.endswith(".jsonl"):
            for conv in iter_jsonl(path):
                # with the conversation's tools, as training renders it: the family's tool prompt is
                # then learned as pieces, not spelled out nearly letter by letter
                tools = list(conv.tools) if conv.tools and template in TOOL_TEMPLATES else None
                yield tpl.render(conv.messages, "", "", tools=tools)
        else:
            yield from Path(path).read_text(encoding="utf-8").splitlines()


def prepare_tiny(
    corpus: Sequence[str],
    out: str,
    vocab_size: int = 1024,
    template: str | None = None,
    seed: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    arch: str = "gpt_neox",
) -> int:
    """Train a tokenizer on `corpus`, build the tiny model, save both to `out`; returns #params.

    `arch` is a `chatkit.architectures` family (gpt_neox: registry entry `tiny`; llama: `tiny-llama`;
    mistral, qwen3, gemma2: `tiny-<family>`), its record's `tiny`; the tokenizer is trained the same way,
    with the template's marker tokens. `template` defaults to the entry's.
    """
    family = get_architecture(arch)
    spec = get_model_spec(family.tiny)
    template = template or spec.template  # the family's own (openchatkit for the GPT-NeoX and Llama ones)
    tpl = get_template(template)
    tokenizer = train_tokenizer(_corpus_texts(corpus, template), vocab_size, extra_tokens=tpl.special_tokens)
    overrides = {}
    if layers:
        overrides["num_hidden_layers"] = layers
    if hidden:
        overrides["hidden_size"] = hidden
        overrides["intermediate_size"] = family.intermediate_size(hidden)
    if heads:
        overrides["num_attention_heads"] = heads
        if "num_key_value_heads" in spec.config:  # as many key/value heads as query heads, as the entry has
            overrides["num_key_value_heads"] = heads
    model = build_model(spec, tokenizer, seed, **overrides)
    save_base(model, tokenizer, out, template)
    return sum(p.numel() for p in model.parameters())


# --- real base models: from the hub or a local copy -----------------------------------------------

DTYPE_NAMES = ("fp32", "bf16", "fp16")
"""`--dtype` choices (chatkit.convert.weights.DTYPES; named here so that --help does not import torch)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A folder holds a tokenizer when it has one of these: fast (tokenizers), sentencepiece, byte-level BPE."""
METADATA_PATTERNS = ("*.json", "*.model", "merges.txt")
"""Config, generation config, tokenizer files and weight indexes (`*.model`: sentencepiece)."""
STALE_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
"""Buffers old checkpoints saved (causal masks, rotary frequencies) that transformers now rebuilds itself."""


class PretrainedError(RuntimeError):
    """A base model that cannot be prepared as asked: the message names the file or repo and what to do."""


@dataclass(frozen=True)
class PreparedBase:
    """What `prepare_base` wrote, for the summary a prepare script prints."""

    out: Path
    source: str
    revision: str | None
    files: dict[str, int]
    """File name -> bytes."""
    tensors: int
    dropped: tuple[str, ...] = ()
    """Stale buffers left out (STALE_BUFFERS)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        at = f" at {self.revision}" if self.revision else ""
        lines = [
            f"wrote {self.out} ({_size(self.total_bytes)}, {self.tensors} tensors) from {self.source}{at}"
        ]
        lines += [f"  {name:<40} {_size(n):>10}" for name, n in self.files.items()]
        if self.dropped:
            lines.append(f"  left out {len(self.dropped)} stale buffer(s), e.g. {self.dropped[0]}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def download_base(
    spec: ModelSpec,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The hub snapshot folder of `spec`: downloaded, or found in the cache (HF_HUB_OFFLINE=1).

    Safetensors when the repository has them, else its pytorch_model*.bin: many repositories hold both,
    and taking both would double a 40 GB transfer. Only the weight files transformers reads are taken
    (not training_args.bin, consolidated.*, files in subfolders such as Meta's original checkpoints).
    The cache is HF_HUB_CACHE / HF_HOME unless `cache_dir` is given.
    """
    folder = _snapshot(spec, [*METADATA_PATTERNS, "model*.safetensors"], revision, token, cache_dir)
    if not any(folder.glob("model*.safetensors")):
        # the commit just resolved (the snapshot folder's name), so both passes read the same one
        folder = _snapshot(spec, [*METADATA_PATTERNS, "pytorch_model*.bin"], folder.name, token, cache_dir)
    return folder


def _snapshot(spec: ModelSpec, patterns: list[str], revision, token, cache_dir) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("fetching %s (%s) from the Hugging Face hub or its cache", spec.hf_id, ", ".join(patterns))
    try:
        folder = snapshot_download(
            spec.hf_id,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=["*/*"],
            token=token,
            cache_dir=cache_dir,
        )
    except OSError as e:  # every hub error (HfHubHTTPError, LocalEntryNotFoundError...) is one
        raise _hub_error(spec, revision, e) from None
    return Path(folder)


def _hub_error(spec: ModelSpec, revision: str | None, e: OSError) -> PretrainedError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"https://huggingface.co/{spec.hf_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status in (401, 403):
        return PretrainedError(
            f"{spec.hf_id} is gated ({type(e).__name__}, HTTP {status}): accept its licence at {page} with "
            "your Hugging Face account, then pass --token, set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(e, RevisionNotFoundError):
        return PretrainedError(f"{spec.hf_id} has no revision {revision!r} (see {page}/tree/main)")
    if isinstance(e, RepositoryNotFoundError):
        return PretrainedError(f"{spec.hf_id}: no such repository on the Hugging Face hub ({page})")
    return PretrainedError(
        f"could not download {spec.hf_id} ({type(e).__name__}: {e}); offline (HF_HUB_OFFLINE=1) the files "
        "must already be in the cache (HF_HOME, HF_HUB_CACHE); or pass --source DIR, a copy you have"
    )


def read_source_config(src: Path, spec: ModelSpec) -> dict[str, Any]:
    """The source's config.json, checked against the registry: the wrong folder fails here, not mid-run."""
    path = src / "config.json"
    if not src.is_dir():
        raise PretrainedError(f"{src}: no such folder")
    if not path.is_file():
        raise PretrainedError(
            f"{path}: missing (a Hugging Face model folder has config.json beside its weights)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") != spec.architecture:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise PretrainedError(
            f"{path}: model_type is {found!r}, but {spec.name} ({spec.hf_id}) is a {spec.architecture} model"
        )
    wrong = [f"{k} {config[k]} (registry: {v})" for k, v in spec.config.items() if config.get(k, v) != v]
    if wrong:
        logger.warning("%s: not the shape of %s: %s", path, spec.name, ", ".join(wrong))
    return config


def _clean_config(config: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """config.json as written: without `auto_map` (the architecture is built into transformers, and no
    code from the hub is copied or run), with the dtype the weights now have."""
    config = dict(config)
    if config.pop("auto_map", None) is not None:
        logger.info(
            "config.json: left out auto_map (custom code); transformers' own %s is used", config["model_type"]
        )
    if dtype is not None:
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        config["dtype"] = name
        if "torch_dtype" in config:  # transformers 4's key
            config["torch_dtype"] = name
    return config


def _save_tokenizer(src: Path, out: Path, spec: ModelSpec) -> None:
    """Load and save the tokenizer with transformers, so a sentencepiece-only folder gains the
    tokenizer.json every engine reads fast; embed the registry template as save_base does."""
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        raise PretrainedError(f"{src}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    sentencepiece = src / "tokenizer.model"
    llama = type(tokenizer).__name__.startswith("LlamaTokenizer") and sentencepiece.is_file()
    if llama:
        # transformers 5 rebuilds a Llama tokenizer with a Metaspace pre-tokenizer that puts the word-start
        # "▁" only at the start of the text (`legacy` false, as Llama-2 publishes it): "<s>[INST]" would
        # not get Meta's "<s>", "▁[". The Meta converter's tokenizer gives sentencepiece's ids (checked),
        # saved so that it reloads as it is (class PreTrainedTokenizerFast, not rebuilt).
        from chatkit.convert.meta_llama import build_tokenizer
        from chatkit.convert.weights import WeightsError

        try:
            tokenizer = build_tokenizer(sentencepiece, tokenizer.model_max_length)
        except WeightsError as e:
            # e.g. OpenLLaMA's model normalizes whitespace, which the Llama pipeline does not reproduce:
            # keep transformers' own tokenizer for it
            logger.warning("tokenizer: keeping transformers' %s (%s)", type(tokenizer).__name__, e)
            llama = False
    if tokenizer.pad_token is None:
        # Batches need one. GPT-NeoX's vocabulary has <|padding|>; Llama's has no pad token, but its <unk>
        # never occurs in (byte-fallback) text, so it can pad.
        vocab = tokenizer.get_vocab()
        pad = next((t for t in ("<|padding|>", "<pad>") if t in vocab), None)
        tokenizer.pad_token = pad or tokenizer.unk_token or tokenizer.eos_token
        logger.info("tokenizer: no pad token, using %r", tokenizer.pad_token)
    tokenizer.chat_template = get_template(spec.template, tokenizer).chat_template
    if llama:
        from chatkit.convert.meta_llama import save_tokenizer

        save_tokenizer(tokenizer, sentencepiece, out)
    else:
        tokenizer.save_pretrained(out)


def _write_base_weights(src: Path, out: Path, dtype: str | None, max_shard_size, progress: bool):
    """Stream the source's weights (safetensors or .bin) into safetensors shards; (tensors, dropped)."""
    from chatkit.convert.weights import DTYPES, hf_refs, write_weights

    refs = hf_refs(src)
    dropped = tuple(r.name for r in refs if r.name.endswith(STALE_BUFFERS))
    refs = [r for r in refs if not r.name.endswith(STALE_BUFFERS)]
    torch_dtype = DTYPES[dtype] if dtype else None
    need, free = sum(r.nbytes(torch_dtype) for r in refs), shutil.disk_usage(out).free
    if need > free:
        raise PretrainedError(f"{out.parent}: the weights need {_size(need)}, only {_size(free)} is free")
    logger.info("writing %d tensors (%s) as safetensors", len(refs), _size(need))
    write_weights(out, refs, max_shard_size, torch_dtype, progress=progress)
    return len(refs), dropped


def prepare_base(
    name: str,
    out: str | Path | None = None,
    source: str | Path | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    token: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> PreparedBase:
    """Write registry model `name` as `out` (default `pretrained/<name>/model`), atomically.

    From `source` (a local Hugging Face folder, read only) or else downloaded (`download_base`). Weights
    are re-written as safetensors, cast to `dtype` (fp32, bf16, fp16) or kept as they are.
    """
    from chatkit.io import atomic_dir, write_json

    spec = get_model_spec(name)
    if spec.hf_id is None:
        raise PretrainedError(f"{spec.name} is built locally: run pretrained/tiny/prepare.py")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise PretrainedError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    out = Path(out or Path("pretrained") / spec.name / "model")
    if source is None:
        src = download_base(spec, revision, token, cache_dir)
        origin, meta = spec.hf_id, {"revision": revision or "main", "commit": src.name}
    else:
        src = Path(source)
        origin, meta = str(src.resolve()), {"revision": revision}
    config = read_source_config(src, spec)
    check_apart(out, {"the source": src}, PretrainedError)
    logger.info("preparing %s in %s from %s", spec.name, out, src)
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", _clean_config(config, dtype))
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        _save_tokenizer(src, tmp, spec)
        tensors, dropped = _write_base_weights(src, tmp, dtype, max_shard_size, progress)
        write_json(tmp / "chatkit.json", {"template": spec.template, "source": origin, **meta})
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    return PreparedBase(out, origin, meta.get("commit") or revision, files, tensors, dropped)


# --- the command line of pretrained/<name>/prepare.py ---------------------------------------------


def _shard_size(text: str) -> str:
    from chatkit.convert.weights import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_base_parser(spec: ModelSpec, description: str | None = None) -> argparse.ArgumentParser:
    script = f"pretrained/{spec.name}/prepare.py"
    facts = (
        f"{spec.hf_id}: {spec.architecture}, {spec.params / 1e9:.1f}B parameters (about "
        f"{2 * spec.params / 1e9:.0f} GB in fp16), chat template {spec.template}"
    )
    p = argparse.ArgumentParser(
        prog=script,
        description=f"{description or f'Prepare {spec.hf_id} as pretrained/{spec.name}/model.'}\n{facts}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source", type=Path, metavar="DIR", help="a local Hugging Face folder (default: download)"
    )
    p.add_argument("--revision", metavar="REV", help="hub branch, tag or commit (default: main)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=Path("pretrained") / spec.name / "model",
        help="output folder (%(default)s)",
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast the weights (default: keep the source's)")
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        metavar="SIZE",
        help="largest weight file (%(default)s)",
    )
    p.add_argument(
        "--token", help="Hugging Face token for gated repositories (default: HF_TOKEN or `hf auth login`)"
    )
    return p


def prepare_main(
    name: str, argv: Sequence[str] | None = None, description: str | None = None
) -> PreparedBase:
    """The whole of a `pretrained/<name>/prepare.py`: parse, prepare, print; exit with a message on bad input."""
    spec = get_model_spec(name)
    args = build_base_parser(spec, description).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatkit.convert.weights import WeightsError

    try:
        done = prepare_base(
            spec.name,
            args.out,
            args.source,
            args.revision,
            args.dtype,
            args.max_shard_size,
            args.token,
            progress=True,
        )
    except (PretrainedError, WeightsError) as e:
        sys.exit(f"error: {e}")
    print(done.summary())
    return done
