"""The pipeline engine: DeepSpeed's `PipelineModule`, combined with data parallelism.

The world splits into pipeline_stages stages times world / pipeline_stages data-parallel replicas.
Each replica reads its own shard of the same batch stream as the ZeRO engine (packing, mixtures).
The engine averages the loss over micro-batches and replicas by itself, so each micro-batch carries
a scale that undoes that average and divides by the step's global trained-token count; what
`train_batch` returns is then the true per-token loss (chatkit.train.loss).
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger

from chatkit.data import TokenizedSet
from chatkit.train import checkpoint
from chatkit.train.context import Run, check_context
from chatkit.train.data import val_shard
from chatkit.train.distributed import all_sum
from chatkit.train.dsconfig import lr_lambda, resolve_ds_config
from chatkit.train.engine import Batch
from chatkit.train.loss import step_scale
from chatkit.train.pipeline_model import build_pipeline, checkpoint_tensors, empty_model, load_parameters


def make_topology(stages: int, world: int):
    """Pipe x data grid; data-parallel degree is world / stages."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    if stages < 2 or world % stages:
        raise ValueError(f"pipeline_stages={stages} must be at least 2 and divide the {world} ranks")
    return PipeDataParallelTopology(num_pp=stages, num_dp=world // stages)


def pipeline_batch(batch: Batch, scale: float) -> tuple[tuple, tuple]:
    """A collated micro-batch -> the engine's (inputs for stage 0, labels for the last stage)."""
    inputs = (batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    return inputs, (batch["labels"], torch.tensor(scale, dtype=torch.float32))


def load_model(run: Run):
    """The model with its parameters on the meta device (shapes only) in the training dtype, with the
    recipe's attention; `build_pipeline` then loads the parameters of this rank's stage alone.

    Template marker tokens grow the embeddings as in the ZeRO engine: the embedding and the head are
    loaded on every stage and resized there (transformers' mean resizing draws from the random state,
    so every rank draws alike); a stage that holds neither puts them back on the meta device."""
    from chatkit.train.adapters import load_dtype
    from chatkit.train.attention import load_kwargs

    model = empty_model(run.cfg.model, load_dtype(run.cfg), **load_kwargs(run.cfg.attention, run.device))
    check_context(model.config, run.cfg)
    if run.added_tokens:
        ends = [model.get_input_embeddings(), model.get_output_embeddings()]
        load_parameters(ends, model, checkpoint_tensors(model, run.cfg.model))
        model.resize_token_embeddings(len(run.tokenizer))
    return model


def checkpoint_interval(cfg, ds_config: dict) -> int:
    """Decoder layers per activation checkpoint: the preset's, or every layer when the recipe sets
    gradient_checkpointing (which the pipeline engine would otherwise never see)."""
    interval = int(ds_config.get("pipeline", {}).get("activation_checkpoint_interval", 0))
    return max(interval, 1) if cfg.gradient_checkpointing else interval


class PipelineEngine:
    def __init__(self, run: Run):
        self.run = run
        self.topo = make_topology(run.cfg.pipeline_stages, run.world)
        self.stages, self.dp_world = self.topo.get_dim("pipe"), self.topo.get_dim("data")
        self.dp_rank = self.topo.get_coord(run.rank).data
        self.engine = self.scheduler = self.model_config = None
        self.n_params = 0

    def setup(self, total_steps: int) -> None:
        import deepspeed

        cfg = self.run.cfg
        model = load_model(self.run)
        self.model_config, self.n_params = model.config, sum(p.numel() for p in model.parameters())
        ds_config = resolve_ds_config(cfg, model.config.hidden_size)
        interval = checkpoint_interval(cfg, ds_config)
        if interval and self.run.main:
            logger.info(f"activation checkpointing: every {interval} pipeline layer(s)")
        module = build_pipeline(
            model,
            self.topo,
            self.run.method.loss_sum,
            partition_method=ds_config.get("pipeline", {}).get("partition", "parameters"),
            activation_checkpoint_interval=interval,
            weights=cfg.model,
        )
        del model  # the stage's modules live on in `module`; the rest were never in memory
        self.engine, *_, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
            ),
        )

    def describe(self) -> tuple[str, int]:
        layout = f"{self.run.world} rank(s) = {self.stages} pipeline stages x {self.dp_world} data-parallel"
        return layout, self.n_params

    def dp_sum(self, values: list[float]) -> list[float]:
        """Sum over this stage's data-parallel group, on the rank's device (nccl has no CPU tensors)."""
        return all_sum(values, self.run.device, self.engine.grid.get_data_parallel_group())

    def train_step(self, micro: list[Batch], count: float) -> dict[str, float]:
        # Every stage draws the same micro-batches; the engine reads them on the first and last only.
        scale = step_scale(count, self.dp_world, len(micro))
        items = [pipeline_batch(b, scale) for b in micro]
        # Already the per-token loss of the step: the mean over micro-batches and replicas of
        # loss_sum * scale, broadcast from the last stage.
        return {"loss": float(self.engine.train_batch(data_iter=iter(items)))}

    def evaluate(self, val_sets: list[TokenizedSet]) -> dict[str, float]:
        """Validation loss per trained token through `eval_batch`, scaled as in training."""
        method, mbs = self.run.method, self.run.cfg.micro_batch_size
        shard = val_shard(val_sets, self.dp_rank, self.dp_world, mbs)
        batches = [
            method.collate([[e] for e in shard[i : i + mbs]], self.run.pad_id)
            for i in range(0, len(shard), mbs)
        ]
        (count,) = self.dp_sum([sum(method.count(b) for b in batches)])
        scale = step_scale(count, self.dp_world, len(batches))
        items = [pipeline_batch(b, scale) for b in batches]
        return {"loss": float(self.engine.eval_batch(data_iter=iter(items), num_micro_batches=len(items)))}

    def token_logps(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError("the pipeline engine trains sft only (config validation says so)")

    def _next_token(self, ids: list[int]) -> int:
        """Greedy next token of `ids`: one forward through every stage (`eval_batch` returning logits on
        the last stage); the choice goes from the last stage to its pipeline, then from replica 0 to
        the other replicas, so every rank takes the same token and all stop together."""
        import torch.distributed as dist

        engine, n = self.engine, len(ids)
        inputs = (torch.tensor([ids]), torch.arange(n).unsqueeze(0), torch.ones(1, n, dtype=torch.long))
        labels = (torch.full((1, n), -100), torch.tensor(0.0))
        # eval_batch adds each output to `total_loss`, which it does not reset: a scalar left by the
        # last train/eval step cannot take logits (and logits left here would break the next one).
        engine.total_loss = None
        _, logits = engine.eval_batch(
            data_iter=iter([(inputs, labels)]), return_logits=True, compute_loss=False, reduce_output=None,
            bcast_loss=False, num_micro_batches=1,
        )  # fmt: skip
        engine.total_loss = None
        token = torch.zeros(1, dtype=torch.long, device=self.run.device)
        if engine.is_last_stage():
            token[0] = int(logits[0, -1].float().argmax())
        grid = engine.grid
        dist.broadcast(
            token, src=grid.stage_to_global(engine.num_stages - 1), group=grid.get_pipe_parallel_group()
        )
        if self.dp_world > 1:
            src = grid.stage_to_global(grid.get_stage_id(), data=0)
            dist.broadcast(token, src=src, group=grid.get_data_parallel_group())
        return int(token.item())

    def sample(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy replies to fixed prompts, run by every rank.

        Without a KV cache each new token re-reads the whole sequence: fine for a few short samples at
        evaluation time, which is all this is for; chat goes through the exported model.
        """
        from chatkit.chat import ReplyAssembler
        from chatkit.conversation import Message
        from chatkit.tokenization import encode_prompt

        tokenizer, template = self.run.tokenizer, self.run.template
        replies = []
        for prompt in prompts:
            ids = encode_prompt(tokenizer, template, [Message("user", prompt)])
            reply = ReplyAssembler(tokenizer, template)
            for _ in range(max_new_tokens):
                token = self._next_token(ids)
                if token == tokenizer.eos_token_id:
                    break
                ids.append(token)
                reply.push(token)
                if reply.stopped:
                    break
            reply.finish()
            replies.append(reply.reply)
        return replies

    def save(self, step: int, epoch: int) -> Path:
        """A checkpoint, with each stage's optimizer order by parameter name (a resume without a
        pipeline converts it: chatkit.train.pipeline_universal)."""
        from chatkit.train.pipeline_universal import NAMES, stage_names

        run = self.run
        stage = self.topo.get_coord(run.rank).pipe
        names = (
            {NAMES.format(stage): stage_names(self.engine.module, self.model_config)}
            if self.dp_rank == 0
            else {}
        )
        return checkpoint.save(
            self.engine, run.cfg, run.tokenizer, step, run.rank, {"epoch": epoch}, self.model_config,
            {"pipeline": True}, dp_world=self.dp_world, own_files=names,
        )  # fmt: skip

    def resume(self, root: Path, tag: str) -> int:
        return int(checkpoint.load(self.engine, root, tag, dp_world=self.dp_world)["step"])

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
