"""DeepSpeed checkpoint -> Hugging Face folder (safetensors, config, tokenizer with chat_template,
generation_config with the right eos), streamed tensor by tensor (chatkit/weights.py).

Reads any layout chatkit.convert.deepspeed reads (ZeRO partitions, pipeline stages) or, for LoRA runs,
merges the adapters into the base (chatkit.convert.lora); no code from a checkpoint ever runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from chatkit.convert.deepspeed import checkpoint_refs, resolve_tag_dir
from chatkit.convert.weights import DTYPES, TensorRef, hf_refs, write_weights
from chatkit.io import atomic_dir, check_apart, read_meta, write_json


def export_refs(tag_dir: Path, base: str | Path | None = None) -> tuple[list[TensorRef], Callable[[], None]]:
    """The refs an export writes: the checkpoint's weights, or for LoRA runs the adapters merged into the
    base model (its full-precision weights, also for QLoRA, whose checkpoint holds 4-bit ones)."""
    if (tag_dir / "adapter_model.safetensors").is_file():
        from chatkit.convert.lora import lora_merged_refs

        base = base or read_meta(tag_dir).get("base_model")
        if not base or not Path(base, "config.json").is_file():
            raise FileNotFoundError(
                f"{tag_dir} holds LoRA adapters; their base model {base!r} is not a folder here: "
                "give it with --base"
            )
        return lora_merged_refs(hf_refs(base), tag_dir), lambda: None
    return checkpoint_refs(tag_dir)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def disk_names(model) -> dict[str, str]:
    """Module state-dict name -> the name `save_pretrained` writes (transformers renames some on save,
    e.g. GPT-NeoX's `lm_head` is `embed_out` on disk). Only one-to-one renames can be streamed."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    by_id = {id(v): k for k, v in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    mapping = {by_id.get(id(v)): k for k, v in reverted.items()}
    if None in mapping or len(mapping) != len(state):
        raise ValueError(f"{model.config.model_type}: saving merges or splits tensors; not streamable")
    return mapping


def to_disk(refs: list[TensorRef], config, where: Path) -> list[TensorRef]:
    """Refs renamed to on-disk names, checked to be exactly the architecture's weights and shapes."""
    model = _meta_model(config)
    names = disk_names(model)
    refs = [TensorRef(names.get(r.name, r.name), r.shape, r.dtype, r.load) for r in refs]
    expected = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    optional = {names[k] for k in tied} if config.tie_word_embeddings else set()
    got = {r.name: r.shape for r in refs if r.name not in optional}
    refs = [r for r in refs if r.name in got]  # tied copies are not written, as transformers does
    missing = sorted(set(expected) - set(got) - optional)
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: weights do not fit the {config.model_type} config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {[(k, got[k], expected[k]) for k in shapes[:5]]}"
        )
    return refs


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    template: str | None = None,
    max_shard_size: str | int = "5GB",
    base: str | Path | None = None,
    architecture: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a Hugging Face folder that `from_pretrained` and `apply_chat_template` use as they are.

    Streamed: weights go tensor by tensor from the checkpoint files into safetensors shards.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from chatkit.templates import get_template

    tag_dir = resolve_tag_dir(checkpoint)
    check_apart(out, {"the checkpoint": tag_dir, **({"the base": base} if base else {})})
    meta = read_meta(tag_dir)
    template_name = template or meta["template"]
    config = AutoConfig.from_pretrained(tag_dir)
    # A QLoRA checkpoint's config still says 4-bit; the export is merged full-precision weights.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if architecture and config.model_type != architecture:
        raise ValueError(f"{tag_dir}: a {config.model_type} checkpoint, not {architecture}")
    tokenizer = AutoTokenizer.from_pretrained(tag_dir)
    # the export renders what training trained: its template, with the run's reasoning policy
    tokenizer.chat_template = get_template(
        template_name, tokenizer, reasoning=meta.get("reasoning")
    ).chat_template
    refs, release = export_refs(tag_dir, base)
    refs = to_disk(refs, config, tag_dir)
    config.dtype = DTYPES[dtype]
    gen = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with atomic_dir(out) as tmp:
        write_weights(tmp, refs, max_shard_size, DTYPES[dtype], progress=progress, on_shard_done=release)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        write_json(tmp / "chatkit.json", {**meta, "template": template_name, "dtype": dtype})
    return Path(out)


def convert_main(argv: list[str] | None, architecture: str | None, doc: str) -> None:
    """The command line of tools/convert_to_hf*.py: any training checkpoint to a Hugging Face folder."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints folder (its `latest`) or one tag folder")
    p.add_argument("--out", required=True, help="output folder (replaced atomically when complete)")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="fp16 weights")
    dtype.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="bf16 weights")
    dtype.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--base", help="base model folder of a LoRA/QLoRA run (default: the one training used)")
    p.add_argument("--template", help="chat template to embed (default: the one training used)")
    args = p.parse_args(argv)
    try:
        out = export_hf(
            args.checkpoint, args.out, args.dtype or "fp32", args.template, args.max_shard_size,
            args.base, architecture, progress=True,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"exported {args.checkpoint} -> {out} ({len(shards)} safetensors file(s), {args.dtype or 'fp32'})")
