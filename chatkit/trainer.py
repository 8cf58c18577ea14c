"""Supervised fine-tuning with DeepSpeed: the same code on CPU ranks (gloo) and on GPUs (nccl).

Loss is the sum of token losses divided by the number of trained tokens of the whole optimizer step
(all ranks, all accumulation micro-batches), so short and long conversations weigh the same per token
however they fall into micro-batches.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from chatkit import adapters, checkpoint
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
from chatkit.monitor import Monitor
from chatkit.templates import get_template
from chatkit.tokenization import IGNORE_INDEX, Encoded, add_template_tokens, padding_id

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


def setup_logging(output_dir: Path, rank: int, file_log: bool = True) -> None:
    logger.remove()
    if rank != 0:
        logger.add(lambda m: tqdm.write(m, end=""), level="WARNING", format="[rank {extra[rank]}] {message}")
        logger.configure(extra={"rank": rank})
        return
    logger.add(lambda m: tqdm.write(m, end=""), level="INFO", format="{time:HH:mm:ss} | {message}")
    if file_log:  # --train-log-backend loguru, as OpenChatKit
        log = output_dir / "train.log"
        logger.add(log, level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}")


def skip_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of training runs.

    DeepSpeed's CPU backend builds that op at start-up (a JIT compile under a file lock in
    ~/.cache/torch_extensions) only for `inference_all_reduce`, which training never calls; gloo does
    every collective we use. Skipping it removes three failure modes met on CPU machines: a rank killed
    while compiling leaves the lock behind and every later run waits on it forever; each rank maps a
    ~69 MB /dev/shm file that is never unlinked, so repeated runs fill /dev/shm; a rank that cannot
    create its file leaves its peer spinning. `build_shm_op` returning None is DeepSpeed's own path for
    machines where the op is unavailable.
    """
    # by module name: `import deepspeed.comm.torch` would give the `torch` that deepspeed.comm re-exports
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed() -> tuple[int, int, torch.device]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    get_accelerator().set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(get_accelerator().device_name(local_rank))


def shutdown_distributed() -> None:
    """Leave the process group together before exiting.

    Without it, interpreter shutdown tears down gloo's threads in whatever order it likes; a rank then
    sometimes dies with "terminate called without an active exception" (exit 250) after a run that
    finished and saved, and the launcher reports the whole run as failed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def val_shard(sets: list[TokenizedSet], rank: int, world: int, multiple: int = 1) -> list[Encoded]:
    """This rank's validation conversations, as many on every rank (a multiple of `multiple`).

    Engines run forward passes collectively (ZeRO-3 gathers, pipelines pass activations), so shards
    are padded with a copy of an example whose labels are all ignored: it adds no loss and no count.
    """
    examples = [s.example(i) for s in sets for i in range(len(s))]
    per_rank = math.ceil(math.ceil(len(examples) / world) / multiple) * multiple
    shard = examples[rank::world]
    filler = Encoded(examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].input_ids))
    return shard + [filler] * (per_rank - len(shard))


def evaluate(engine, sets: list[TokenizedSet], cfg: TrainConfig, rank: int, world: int, device, pad_id: int):
    """Validation loss per trained token over all ranks, one conversation per row."""
    shard = val_shard(sets, rank, world)
    per_rank = len(shard)
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
    """Checkpoint `stepN` atomically (see chatkit.checkpoint.save)."""
    return checkpoint.save(engine, cfg, tokenizer, step, rank, {"epoch": epoch})


def prepare_data(cfg: TrainConfig, tokenizer, template, rank: int, world: int, out: Path):
    """Tokenized train/val sets and the rank's batch stream; logs what was kept and dropped."""
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
        sets, weights, cfg.micro_batch_size, cfg.max_length, cfg.pack, rank, world, cfg.seed, padding_id(tokenizer)
    )  # fmt: skip
    return batches, val_sets


def build_engine(cfg: TrainConfig, tokenizer, added_tokens: int, total_steps: int, device, rank: int):
    """The model (full, LoRA or QLoRA) wrapped by DeepSpeed with the preset's ZeRO stage."""
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(cfg.model)
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context of {context} tokens")
    if cfg.precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32"
        )
    ds_config = resolve_ds_config(cfg, model_config.hidden_size)
    adapters.check_engine(cfg, ds_config)
    # Keeps transformers aware of ZeRO-3, so large models are partitioned while they load.
    zero3 = ds_config["zero_optimization"].get("stage") == 3 and not cfg.lora_r
    _hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = adapters.load_base(cfg, device)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
        if rank == 0:
            logger.info(
                f"added the template's {added_tokens} marker token(s) to the tokenizer and embeddings"
            )
    model = adapters.apply_adapters(model, cfg)
    optimizer = adapters.client_optimizer(cfg, model, ds_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        ),
    )
    del _hf_ds
    return engine, scheduler


def sample_replies(engine, tokenizer, template, prompts: list[str], device) -> list[str]:
    """Greedy replies to fixed prompts; every rank runs them (ZeRO-3 forwards are collective)."""
    from chatkit.chat import ChatEngine, GenerationParams
    from chatkit.conversation import Message

    chat = ChatEngine(engine.module, tokenizer, template, device)
    params = GenerationParams(max_new_tokens=64, sample=False)
    try:
        return [chat.reply([Message("user", p)], params) for p in prompts]
    finally:
        engine.train()


def log_samples(step: int, prompts: list[str], replies: list[str], rank: int, monitor) -> None:
    """Sample replies to the log and to metrics.jsonl (rank 0), one line per prompt."""
    if rank != 0:
        return
    for prompt, reply in zip(prompts, replies, strict=True):
        logger.info(f"sample step {step} | {prompt!r} -> {reply!r}")
    monitor.write({"step": step, "samples": dict(zip(prompts, replies, strict=True))})


def run_eval(
    engine, val_sets, cfg, rank, world, device, tokenizer, template, step, monitor
) -> dict[str, float]:
    """Validation loss and perplexity, and sample replies to the recipe's eval_prompts, logged."""
    row: dict[str, float] = {}
    if val_sets:
        val_loss = evaluate(engine, val_sets, cfg, rank, world, device, padding_id(tokenizer))
        row = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if rank == 0:
            logger.info(f"eval step {step} | val_loss {val_loss:.4f} | ppl {row['val_ppl']:.2f}")
    if cfg.eval_prompts:
        log_samples(
            step,
            cfg.eval_prompts,
            sample_replies(engine, tokenizer, template, cfg.eval_prompts, device),
            rank,
            monitor,
        )
    if row:
        monitor.write({"step": step, **row})
    return row


def train(cfg: TrainConfig) -> dict[str, float]:
    if cfg.pipeline_stages > 1:
        from chatkit.trainer_pipeline import train_pipeline

        return train_pipeline(cfg)
    from transformers import AutoTokenizer

    rank, world, device = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, rank, "loguru" in cfg.train_log_backend)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    template = get_template(cfg.template, tokenizer)
    added_tokens = add_template_tokens(tokenizer, template)
    batches, val_sets = prepare_data(cfg, tokenizer, template, rank, world, out)
    gas = cfg.gradient_accumulation_steps
    steps_per_epoch = batches.steps_per_epoch(gas)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    engine, scheduler = build_engine(cfg, tokenizer, added_tokens, total_steps, device, rank)
    start = 0
    resume = checkpoint.find_resume(cfg)
    if resume:
        start = int(checkpoint.load(engine, *resume, quantized=bool(cfg.quantize))["step"])
        if rank == 0:
            logger.info(f"resumed from {resume[0] / resume[1]} at step {start}")
    if rank == 0:
        save_config(cfg, out / "train_config.yaml")
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        logger.info(
            f"{sum(len(t) for t in batches.sets)} conversations, {'packed ' if cfg.pack else ''}rows of "
            f"{cfg.max_length}, {world} rank(s), {cfg.micro_batch_size * world * gas} rows per step, "
            f"{total_steps} steps, {n_params:,} parameters, deepspeed={cfg.deepspeed}, {cfg.precision}"
        )
    stream = batches.stream(skip=start * gas)
    monitor = Monitor(cfg, out, rank == 0)
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    # from_pretrained returns modules in eval mode and DeepSpeed leaves them so (PEFT's new adapters
    # are the exception): without this, dropout is off and bitsandbytes takes its inference path.
    engine.train()
    for step in range(start + 1, total_steps + 1):
        micro = [next(stream) for _ in range(gas)]
        global_count, step_tokens = all_sum(
            [sum(trained_count(b) for _, b in micro), sum(real_tokens(b) for _, b in micro)], device
        )
        loss_total = 0.0
        for _, b in micro:
            b = to_device(b, device)
            loss_sum = token_loss_sum(forward_logits(engine, b), b["labels"])
            # DeepSpeed divides by the accumulation steps and averages over ranks: undo both, so the
            # gradient is that of (sum of token losses / trained tokens of the whole step).
            engine.backward(loss_sum * (world * gas / max(global_count, 1)))
            engine.step()
            loss_total += float(loss_sum.detach())
        checkpoint._fault("step", step)
        monitor.count_tokens(step_tokens)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            loss = all_sum([loss_total], device)[0] / max(global_count, 1)  # a collective: every rank
            last = monitor.log_step(step, total_steps, steps_per_epoch, loss, scheduler.get_last_lr()[0])
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
            last.update(
                run_eval(engine, val_sets, cfg, rank, world, device, tokenizer, template, step, monitor)
            )
        if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            save_checkpoint(engine, cfg, tokenizer, step, micro[-1][0], rank)
    bar.close()
    last.update(
        run_eval(engine, val_sets, cfg, rank, world, device, tokenizer, template, total_steps, monitor)
    )
    path = save_checkpoint(engine, cfg, tokenizer, total_steps, int(last.get("epoch", 0)), rank)
    if rank == 0:
        logger.info(f"saved checkpoint {path}")
        write_json(out / "final_metrics.json", last)
    monitor.close()
    return last
