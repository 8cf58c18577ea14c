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
from chatkit.data import collate, micro_batches, tokenize_files
from chatkit.io import write_json
from chatkit.templates import get_template
from chatkit.tokenization import IGNORE_INDEX, Encoded

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


def evaluate(engine, examples: list[Encoded], cfg: TrainConfig, rank: int, world: int, device, pad_id: int):
    """Validation loss per trained token over all ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively):
    shards are padded with an example whose labels are all ignored.
    """
    per_rank = math.ceil(len(examples) / world)
    shard = examples[rank::world]
    filler = Encoded(examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].input_ids))
    shard = shard + [filler] * (per_rank - len(shard))
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, per_rank, cfg.micro_batch_size):
            batch = to_device(collate(shard[i : i + cfg.micro_batch_size], pad_id), device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(token_loss_sum(logits, batch["labels"]))
            count += trained_count(batch)
    engine.train()
    total, count = all_sum([total, count], device)
    return total / max(count, 1)


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
    template = get_template(cfg.template)
    data = tokenize_files(cfg.train_files, tokenizer, template, cfg.max_length, show_progress=rank == 0)
    val = (
        tokenize_files(cfg.val_files, tokenizer, template, cfg.max_length, False).examples
        if cfg.val_files
        else []
    )
    per_step = cfg.micro_batch_size * world * cfg.gradient_accumulation_steps
    steps_per_epoch = len(data.examples) // per_step
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(cfg.model).hidden_size
    ds_config = resolve_ds_config(cfg, hidden)
    # Keeps transformers aware of ZeRO-3, so large models are partitioned while they load.
    _hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
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
            f"{len(data.examples)} conversations, {world} rank(s), {per_step} per step, "
            f"{total_steps} steps, {n_params:,} parameters, deepspeed={cfg.deepspeed}, {cfg.precision}"
        )
    stream = micro_batches(data.examples, cfg.micro_batch_size, rank, world, cfg.seed, tokenizer.pad_token_id)
    metrics_f = (out / "metrics.jsonl").open("a", encoding="utf-8") if rank == 0 else None
    bar = tqdm(total=total_steps, desc="train", disable=rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    epoch, t_last, tokens_since = 0, time.perf_counter(), 0.0
    for step in range(1, total_steps + 1):
        batches = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        epoch = batches[-1][0]
        local_count = sum(trained_count(b) for _, b in batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for _, b in batches)
        global_count, step_tokens = all_sum([local_count, local_tokens], device)
        loss_total = 0.0
        for _, b in batches:
            b = to_device(b, device)
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum = token_loss_sum(logits, b["labels"])
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
        if val and cfg.eval_every and step % cfg.eval_every == 0:
            last["val_loss"] = _log_eval(engine, val, cfg, rank, world, device, tokenizer, step, metrics_f)
        if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            save_checkpoint(engine, cfg, tokenizer, step, epoch, rank)
    bar.close()
    if val:
        last["val_loss"] = _log_eval(engine, val, cfg, rank, world, device, tokenizer, total_steps, metrics_f)
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
