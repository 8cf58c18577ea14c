"""Pipeline-parallel fine-tuning (DeepSpeed `PipelineModule`), combined with data parallelism.

    deepspeed --num_gpus 2 --module chatkit.trainer_pipeline --config config/tiny.yaml pipeline_stages=2 deepspeed=pipeline

The world splits into pipeline_stages stages times world / pipeline_stages data-parallel replicas.
Each replica reads its own shard of the same `Batches` stream as the main trainer (packing,
mixtures). The loss is normalised as there: the sum of token losses over the trained tokens of the
whole optimizer step (all replicas, all micro-batches). The engine averages the loss over
micro-batches and replicas by itself, so each micro-batch carries a scale that undoes that average
and divides by the step's global trained-token count; what `train_batch` returns is then the true
per-token loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from chatkit import checkpoint
from chatkit.config import TrainConfig, save_config
from chatkit.data import Batches, DataSource, collate_rows, describe, save_data_stats
from chatkit.io import write_json
from chatkit.monitor import Monitor
from chatkit.pipeline import build_pipeline, pipeline_batch
from chatkit.templates import get_template
from chatkit.tokenization import add_template_tokens, padding_id
from chatkit.trainer import (
    init_distributed,
    load_sets,
    log_samples,
    lr_lambda,
    real_tokens,
    resolve_ds_config,
    setup_logging,
    trained_count,
    val_shard,
)


def make_topology(stages: int, world: int):
    """Pipe x data grid; data-parallel degree is world / stages."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    if stages < 2 or world % stages:
        raise ValueError(f"pipeline_stages={stages} must be at least 2 and divide the {world} ranks")
    return PipeDataParallelTopology(num_pp=stages, num_dp=world // stages)


def dp_sum(values: list[float], group) -> list[float]:
    """Sum over one stage's data-parallel group (the ranks that see different data)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def step_scale(global_count: float, dp_world: int, accumulation: int) -> float:
    """Per-micro-batch loss factor: the engine divides by accumulation and averages over replicas;
    undo both, so the gradient is that of (sum of token losses / trained tokens of the step)."""
    return dp_world * accumulation / max(global_count, 1)


def load_model(cfg: TrainConfig, tokenizer, added_tokens: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context of {context} tokens")
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    return model


def load_batches(cfg: TrainConfig, tokenizer, template, rank: int, dp_rank: int, dp_world: int) -> Batches:
    """The main trainer's data stream, sharded by data-parallel replica instead of by rank."""
    sources = [DataSource.parse(spec) for spec in cfg.train_files]
    sets = load_sets(cfg.train_files, tokenizer, template, cfg, rank)
    if rank == 0:
        for src, ts in zip(sources, sets, strict=True):
            logger.info(describe(src.path, ts, cfg.max_length))
        save_data_stats(Path(cfg.output_dir) / "data_stats.json", sources, sets)
    weights = None
    if any(src.weight is not None for src in sources):
        weights = [1.0 if src.weight is None else src.weight for src in sources]
    return Batches(
        sets, weights, cfg.micro_batch_size, cfg.max_length, cfg.pack,
        dp_rank, dp_world, cfg.seed, padding_id(tokenizer),
    )  # fmt: skip


def train_pipeline(cfg: TrainConfig) -> dict[str, float]:
    """Train with cfg.pipeline_stages stages; returns the last logged metrics (as train() does)."""
    import deepspeed
    from transformers import AutoTokenizer

    rank, world, _ = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, rank, "loguru" in getattr(cfg, "train_log_backend", ["loguru"]))
    torch.manual_seed(cfg.seed)

    topo = make_topology(cfg.pipeline_stages, world)
    coord = topo.get_coord(rank)
    stages, dp_world = topo.get_dim("pipe"), topo.get_dim("data")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    template = get_template(cfg.template, tokenizer)
    added_tokens = add_template_tokens(tokenizer, template)
    batches = load_batches(cfg, tokenizer, template, rank, coord.data, dp_world)
    val_sets = load_sets(cfg.val_files, tokenizer, template, cfg, rank) if cfg.val_files else []
    steps_per_epoch = batches.steps_per_epoch(cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    model = load_model(cfg, tokenizer, added_tokens)
    ds_config = resolve_ds_config(cfg, model.config.hidden_size)
    pipe_opts = ds_config.get("pipeline", {})
    module = build_pipeline(
        model,
        topo,
        partition_method=pipe_opts.get("partition", "parameters"),
        activation_checkpoint_interval=int(pipe_opts.get("activation_checkpoint_interval", 0)),
    )
    engine, *_, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        ),
    )
    if rank == 0:
        save_config(cfg, out / "train_config.yaml")
        logger.info(
            f"{sum(len(t) for t in batches.sets)} conversations, {'packed ' if cfg.pack else ''}rows of {cfg.max_length}, "
            f"{world} rank(s) = {stages} pipeline stages x {dp_world} data-parallel, "
            f"{cfg.micro_batch_size * dp_world * cfg.gradient_accumulation_steps} rows per step, "
            f"{total_steps} steps, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"deepspeed={cfg.deepspeed}, {cfg.precision}"
        )
    return _loop(
        cfg,
        engine,
        scheduler,
        batches,
        val_sets,
        tokenizer,
        template,
        model.config,
        total_steps,
        steps_per_epoch,
    )


def next_step(stream, engine, cfg: TrainConfig) -> tuple[int, list, float]:
    """The step's micro-batches as engine items (scale included), its epoch and its real tokens.

    Every stage draws the same micro-batches (same data-parallel shard), so all agree on the epoch
    and the number of steps; the engine reads them only on the first and last stages.
    """
    micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
    local = [sum(trained_count(b) for _, b in micro), sum(real_tokens(b) for _, b in micro)]
    global_count, step_tokens = dp_sum(local, engine.grid.get_data_parallel_group())
    scale = step_scale(global_count, engine.grid.get_data_parallel_world_size(), len(micro))
    return micro[-1][0], [pipeline_batch(b, scale) for _, b in micro], step_tokens


def evaluate_pipeline(engine, val_sets, cfg: TrainConfig, pad_id: int) -> float:
    """Validation loss per trained token through `engine.eval_batch`, scaled as in training.

    eval_batch averages loss_fn's outputs over micro-batches and data-parallel replicas, so each
    micro-batch's loss sum is scaled by replicas * micro-batches / trained tokens of the whole set.
    """
    dp_rank, dp_world = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    shard = val_shard(val_sets, dp_rank, dp_world, cfg.micro_batch_size)
    mbs = cfg.micro_batch_size
    batches = [collate_rows([[e] for e in shard[i : i + mbs]], pad_id) for i in range(0, len(shard), mbs)]
    (count,) = dp_sum([sum(trained_count(b) for b in batches)], engine.grid.get_data_parallel_group())
    scale = step_scale(count, dp_world, len(batches))
    items = [pipeline_batch(b, scale) for b in batches]
    return float(engine.eval_batch(data_iter=iter(items), num_micro_batches=len(items)))


def _next_token_through_pipeline(engine, ids: list[int]) -> int:
    """Greedy next token of `ids`: one forward through every stage (`eval_batch` returning logits on
    the last stage), the choice broadcast from the last stage to the others of this pipeline."""
    import torch.distributed as dist

    n = len(ids)
    row = torch.tensor([ids])
    inputs = (row, torch.arange(n).unsqueeze(0), torch.ones(1, n, dtype=torch.long))
    labels = (torch.full((1, n), -100), torch.tensor(0.0))
    # eval_batch adds each output to `total_loss`, which it does not reset: a scalar left by the
    # last train/eval step cannot take logits (and logits left here would break the next one).
    engine.total_loss = None
    _, logits = engine.eval_batch(
        data_iter=iter([(inputs, labels)]), return_logits=True, compute_loss=False, reduce_output=None,
        bcast_loss=False, num_micro_batches=1,
    )  # fmt: skip
    engine.total_loss = None
    token = torch.zeros(1, dtype=torch.long, device=engine.device)
    if engine.is_last_stage():
        token[0] = int(logits[0, -1].float().argmax())
    last = engine.grid.stage_to_global(engine.num_stages - 1)
    dist.broadcast(token, src=last, group=engine.grid.get_pipe_parallel_group())
    return int(token)


def sample_replies_pipeline(engine, tokenizer, template, prompts: list[str], max_new_tokens: int = 64):
    """Greedy replies to fixed prompts, run by every rank (each pipeline generates them alike).

    Without a KV cache each new token re-reads the whole sequence: fine for a few short samples at
    evaluation time, which is all this is for; chat goes through the exported model.
    """
    from chatkit.chat import ReplyAssembler
    from chatkit.conversation import Message
    from chatkit.tokenization import encode_prompt

    eos = tokenizer.eos_token_id
    replies = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, template, [Message("user", prompt)])
        reply = ReplyAssembler(tokenizer, template)
        for _ in range(max_new_tokens):
            token = _next_token_through_pipeline(engine, ids)
            if token == eos:
                break
            ids.append(token)
            reply.push(token)
            if reply.stopped:
                break
        reply.finish()
        replies.append(reply.reply)
    return replies


def _log_eval(engine, val_sets, cfg, tokenizer, template, step: int, monitor, rank: int) -> dict[str, float]:
    """Validation loss and perplexity, and sample replies to eval_prompts, as the ZeRO trainer logs them."""
    row: dict[str, float] = {}
    if val_sets:
        val_loss = evaluate_pipeline(engine, val_sets, cfg, padding_id(tokenizer))
        row = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if rank == 0:
            logger.info(f"eval step {step} | val_loss {val_loss:.4f} | ppl {row['val_ppl']:.2f}")
    if cfg.eval_prompts:
        replies = sample_replies_pipeline(engine, tokenizer, template, cfg.eval_prompts)
        log_samples(step, cfg.eval_prompts, replies, rank, monitor)
    if row:
        monitor.write({"step": step, **row})
    return row


def _loop(
    cfg, engine, scheduler, batches, val_sets, tokenizer, template, model_config, total_steps, steps_per_epoch
):
    import torch.distributed as dist

    rank, out = dist.get_rank(), Path(cfg.output_dir)
    start = 0
    resume = checkpoint.find_resume(cfg)
    if resume:
        start = int(checkpoint.load(engine, *resume)["step"])
        if rank == 0:
            logger.info(f"resumed from {resume[0] / resume[1]} at step {start}")
    stream = batches.stream(skip=start * cfg.gradient_accumulation_steps)
    monitor = Monitor(cfg, out, rank == 0)
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    epoch = 0

    def save(step: int) -> Path:
        extra = {"epoch": epoch}
        return checkpoint.save(engine, cfg, tokenizer, step, rank, extra, model_config, {"pipeline": True})

    for step in range(start + 1, total_steps + 1):
        epoch, items, step_tokens = next_step(stream, engine, cfg)
        # Already the per-token loss of the step: the mean over micro-batches and replicas of
        # loss_sum * scale (see step_scale), broadcast from the last stage.
        loss = float(engine.train_batch(data_iter=iter(items)))
        checkpoint._fault("step", step)
        monitor.count_tokens(step_tokens)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            last = monitor.log_step(step, total_steps, steps_per_epoch, loss, scheduler.get_last_lr()[0])
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
            last.update(_log_eval(engine, val_sets, cfg, tokenizer, template, step, monitor, rank))
        if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            save(step)
    bar.close()
    last.update(_log_eval(engine, val_sets, cfg, tokenizer, template, total_steps, monitor, rank))
    path = save(total_steps)
    if rank == 0:
        logger.info(f"saved checkpoint {path}")
        write_json(out / "final_metrics.json", last)
    monitor.close()
    return last


def main() -> None:
    import argparse
    import sys
    import warnings

    from chatkit.config import ConfigError, load_config

    # torch's gloo path warns on every collective DeepSpeed makes; the message is not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe in config/")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the recipe")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    train_pipeline(cfg)


if __name__ == "__main__":
    main()
