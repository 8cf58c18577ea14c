"""Supervised fine-tuning with DeepSpeed: the same code on CPU ranks (gloo) and on GPUs (nccl).

Loss is the sum of token losses divided by the number of trained tokens of the whole optimizer step
(all ranks, all accumulation micro-batches), so short and long conversations weigh the same per token
however they fall into micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from chatkit.config import TrainConfig, save_config
from chatkit.data import (
    Batches,
    DataSource,
    TokenizedSet,
    block_causal_mask,
    collate_rows,
    describe,
    save_data_stats,
    tokenize_file,
)
from chatkit.io import write_json
from chatkit.templates import get_template
from chatkit.tokenization import IGNORE_INDEX, Encoded, add_template_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_ds_config(cfg: TrainConfig, hidden_size: int) -> dict[str, Any]:
    """Load the named DeepSpeed preset and fill its "auto" fields from the training config."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        path = REPO_ROOT / "dsconfig" / f"{cfg.deepspeed}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO_ROOT / "dsconfig").glob("*.json"))
        raise FileNotFoundError(f"deepspeed config {cfg.deepspeed!r} not found; known: {', '.join(known)}")
    ds = json.loads(path.read_text())
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.grad_clip,
        "lr": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "reduce_bucket_size": hidden_size * hidden_size,
    }

    def fill(node: Any, key: str | None = None, parent: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, k, key) for k, v in node.items()}
        if node != "auto":
            return node
        if key == "enabled" and parent in ("bf16", "fp16"):
            return cfg.precision == parent
        if key not in auto:
            raise ValueError(f'{path}: no value known for "auto" field {key!r}')
        return auto[key]

    return fill(ds)


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio, as a multiplier of the peak rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def trained_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (padding has negative segment ids)."""
    return int((batch["segment_ids"] >= 0).sum())


def forward_logits(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits with per-conversation positions and block-diagonal causal attention."""
    dtype = next(engine.module.parameters()).dtype
    mask = block_causal_mask(batch["segment_ids"], dtype)
    return engine(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    ).logits


def setup_logging(output_dir: Path, rank: int) -> None:
    logger.remove()
    if rank != 0:
        logger.add(lambda m: tqdm.write(m, end=""), level="WARNING", format="[rank {extra[rank]}] {message}")
        logger.configure(extra={"rank": rank})
        return
    logger.add(lambda m: tqdm.write(m, end=""), level="INFO", format="{time:HH:mm:ss} | {message}")
    logger.add(
        output_dir / "train.log", level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}"
    )


def init_distributed() -> tuple[int, int, torch.device]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    get_accelerator().set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(get_accelerator().device_name(local_rank))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate(engine, sets: list[TokenizedSet], cfg: TrainConfig, rank: int, world: int, device, pad_id: int):
    """Validation loss per trained token over all ranks, one conversation per row.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively):
    shards are padded with a copy of an example whose labels are all ignored.
    """
    examples = [s.example(i) for s in sets for i in range(len(s))]
    per_rank = math.ceil(len(examples) / world)
    shard = examples[rank::world]
    filler = Encoded(examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].input_ids))
    shard = shard + [filler] * (per_rank - len(shard))
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, per_rank, cfg.micro_batch_size):
            rows = [[e] for e in shard[i : i + cfg.micro_batch_size]]
            batch = to_device(collate_rows(rows, pad_id), device)
            total += float(token_loss_sum(forward_logits(engine, batch), batch["labels"]))
            count += trained_count(batch)
    engine.train()
    total, count = all_sum([total, count], device)
    return total / max(count, 1)


def load_sets(specs: list[str], tokenizer, template, cfg: TrainConfig, rank: int) -> list[TokenizedSet]:
    """Rank 0 tokenizes (in several processes) and fills the cache; the other ranks then read it."""
    import torch.distributed as dist

    procs = cfg.tokenize_procs or min(8, os.cpu_count() or 1)
    sets = []
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            sets = [
                tokenize_file(
                    DataSource.parse(spec).path,
                    tokenizer,
                    template,
                    cfg.max_length,
                    cfg.overlong,
                    procs if rank == 0 else 1,
                    cfg.cache_dir or None,
                    show_progress=rank == 0,
                )  # fmt: skip
                for spec in specs
            ]
        dist.barrier()
    return sets


def save_checkpoint(engine, cfg: TrainConfig, tokenizer, step: int, epoch: int, rank: int) -> Path:
    """DeepSpeed checkpoint plus what export and chat need: tokenizer, model config, template.

    Metadata goes in first; DeepSpeed updates its `latest` pointer only after every shard is written,
    so a crash mid-save leaves `latest` on the previous complete checkpoint.
    """
    import torch.distributed as dist

    root = Path(cfg.output_dir) / "checkpoints"
    tag = f"step{step}"
    if rank == 0:
        (root / tag).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(root / tag)
        engine.module.config.save_pretrained(root / tag)
        write_json(
            root / tag / "chatkit.json", {"template": cfg.template, "base_model": cfg.model, "step": step}
        )
        save_config(cfg, root / tag / "train_config.yaml")
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "epoch": epoch})
    dist.barrier()
    return root / tag


def train(cfg: TrainConfig) -> dict[str, float]:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    rank, world, device = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, rank)
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    template = get_template(cfg.template, tokenizer)
    added_tokens = add_template_tokens(tokenizer, template)
    sources = [DataSource.parse(spec) for spec in cfg.train_files]
    sets = load_sets(cfg.train_files, tokenizer, template, cfg, rank)
    val_sets = load_sets(cfg.val_files, tokenizer, template, cfg, rank) if cfg.val_files else []
    if rank == 0:
        for src, ts in zip(sources, sets, strict=True):
            logger.info(describe(src.path, ts, cfg.max_length))
        save_data_stats(out / "data_stats.json", sources, sets)
    weights = None
    if any(src.weight is not None for src in sources):
        weights = [1.0 if src.weight is None else src.weight for src in sources]
    batches = Batches(
        sets,
        weights,
        cfg.micro_batch_size,
        cfg.max_length,
        cfg.pack,
        rank,
        world,
        cfg.seed,
        tokenizer.pad_token_id,
    )
    per_step = cfg.micro_batch_size * world * cfg.gradient_accumulation_steps
    steps_per_epoch = batches.steps_per_epoch(cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model)
    hidden = model_config.hidden_size
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context of {context} tokens")
    ds_config = resolve_ds_config(cfg, hidden)
    # Keeps transformers aware of ZeRO-3, so large models are partitioned while they load.
    _hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
        if rank == 0:
            logger.info(
                f"added the template's {added_tokens} marker token(s) to the tokenizer and embeddings"
            )
    engine, *_, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        ),
    )
    del _hf_ds
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    if rank == 0:
        save_config(cfg, out / "train_config.yaml")
        logger.info(
            f"{sum(len(t) for t in sets)} conversations, {'packed ' if cfg.pack else ''}rows of {cfg.max_length}, "
            f"{world} rank(s), {per_step} rows per step, "
            f"{total_steps} steps, {n_params:,} parameters, deepspeed={cfg.deepspeed}, {cfg.precision}"
        )
    stream = batches.stream()
    metrics_f = (out / "metrics.jsonl").open("a", encoding="utf-8") if rank == 0 else None
    bar = tqdm(total=total_steps, desc="train", disable=rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    epoch, t_last, tokens_since = 0, time.perf_counter(), 0.0
    for step in range(1, total_steps + 1):
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        epoch = micro[-1][0]
        local_count = sum(trained_count(b) for _, b in micro)
        local_tokens = sum(real_tokens(b) for _, b in micro)
        global_count, step_tokens = all_sum([local_count, local_tokens], device)
        loss_total = 0.0
        for _, b in micro:
            b = to_device(b, device)
            loss_sum = token_loss_sum(forward_logits(engine, b), b["labels"])
            # DeepSpeed divides by the accumulation steps and averages over ranks: undo both, so the
            # gradient is that of (sum of token losses / trained tokens of the whole step).
            engine.backward(loss_sum * (world * cfg.gradient_accumulation_steps / max(global_count, 1)))
            engine.step()
            loss_total += float(loss_sum.detach())
        tokens_since += step_tokens
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            loss = all_sum([loss_total], device)[0] / max(global_count, 1)
            now = time.perf_counter()
            last = {
                "step": step,
                "epoch": round(step / max(steps_per_epoch, 1), 4),
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_since / (now - t_last),
            }
            t_last, tokens_since = now, 0.0
            if rank == 0:
                logger.info(
                    f"step {step}/{total_steps} | loss {loss:.4f} | lr {last['lr']:.2e} | "
                    f"tok/s {last['tokens_per_s']:,.0f} | epoch {last['epoch']:.2f}"
                )
                metrics_f.write(json.dumps(last) + "\n")
                metrics_f.flush()
        if val_sets and cfg.eval_every and step % cfg.eval_every == 0:
            last["val_loss"] = _log_eval(
                engine, val_sets, cfg, rank, world, device, tokenizer, step, metrics_f
            )
        if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            save_checkpoint(engine, cfg, tokenizer, step, epoch, rank)
    bar.close()
    if val_sets:
        last["val_loss"] = _log_eval(
            engine, val_sets, cfg, rank, world, device, tokenizer, total_steps, metrics_f
        )
    path = save_checkpoint(engine, cfg, tokenizer, total_steps, epoch, rank)
    if rank == 0:
        logger.info(f"saved checkpoint {path}")
        write_json(out / "final_metrics.json", last)
        metrics_f.close()
    return last


def _log_eval(engine, val, cfg, rank, world, device, tokenizer, step, metrics_f) -> float:
    val_loss = evaluate(engine, val, cfg, rank, world, device, tokenizer.pad_token_id)
    if rank == 0:
        logger.info(f"eval step {step} | val_loss {val_loss:.4f} | ppl {math.exp(min(val_loss, 50)):.2f}")
        metrics_f.write(
            json.dumps({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}) + "\n"
        )
        metrics_f.flush()
    return val_loss


def config_summary(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), indent=2)
