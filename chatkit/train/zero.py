"""The ZeRO engine: a Hugging Face model (full, LoRA or QLoRA) under DeepSpeed ZeRO stage 0-3.

Every rank is a data-parallel replica; ZeRO shards optimizer states (1), gradients (2) and weights (3)
over them. Packed rows attend block-diagonally: positions restart per conversation and the attention
implementation keeps conversations apart from them (chatkit.train.attention).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.data import TokenizedSet
from chatkit.train import adapters, checkpoint
from chatkit.train.attention import packed_forward_kwargs
from chatkit.train.chunked import call_in_engine_forward, chunking_helps
from chatkit.train.context import Run, check_context
from chatkit.train.data import val_shard
from chatkit.train.distributed import all_sum
from chatkit.train.dsconfig import lr_lambda, resolve_ds_config
from chatkit.train.engine import Batch
from chatkit.train.loss import Output, per_unit, step_scale


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def build_engine(run: Run, total_steps: int):
    """The model (full, LoRA or QLoRA) wrapped by DeepSpeed with the preset's ZeRO stage."""
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    cfg = run.cfg
    model_config = AutoConfig.from_pretrained(cfg.model)
    check_context(model_config, cfg)
    if cfg.precision == "fp16" and run.device.type == "cpu":
        raise ValueError(
            "precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32"
        )
    ds_config = resolve_ds_config(cfg, model_config.hidden_size)
    adapters.check_engine(cfg, ds_config)
    # Keeps transformers aware of ZeRO-3, so the model is built inside zero.Init and each rank keeps
    # only its partition as the weights load: full fine-tuning and LoRA alike (PEFT's adapters, made
    # afterwards, are partitioned by deepspeed.initialize). Not a quantized base: check_engine refuses
    # it, and transformers would load it whole on every rank anyway (bitsandbytes quantizes on load).
    zero3 = ds_config["zero_optimization"].get("stage") == 3 and not cfg.quantize
    _hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = adapters.load_base(cfg, run.device)
    if run.added_tokens:
        model.resize_token_embeddings(len(run.tokenizer))
        if run.main:
            logger.info(
                f"added the template's {run.added_tokens} marker token(s) to the tokenizer and embeddings"
            )
    model = adapters.apply_adapters(model, cfg)
    if zero3:
        adapters.match_dtype(model, adapters.load_dtype(cfg))
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


class ZeroEngine:
    def __init__(self, run: Run):
        self.run = run
        self.dp_rank, self.dp_world = run.rank, run.world
        self.engine = self.scheduler = None

    def setup(self, total_steps: int) -> None:
        self.engine, self.scheduler = build_engine(self.run, total_steps)
        # from_pretrained returns modules in eval mode and DeepSpeed leaves them so (PEFT's new adapters
        # are the exception): without this, dropout is off and bitsandbytes takes its inference path.
        self.engine.train()

    def describe(self) -> tuple[str, int]:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return f"{self.run.world} rank(s)", n

    def dp_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.run.device)

    def _head(self) -> torch.nn.Linear | None:
        """The output projection when the chunked loss can use it: a plain linear layer (not one
        wrapped by LoRA or quantised) whose output is the logits (Gemma 2 soft-caps them after the
        head), else None."""
        model = self.engine.module
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(hf.config, "final_logit_softcapping", None):
            return None
        head = hf.get_output_embeddings()
        return head if type(head) is torch.nn.Linear else None

    def _chunked(self, batch: Batch) -> bool:
        """Whether this micro-batch's loss comes from hidden states chunk by chunk (chatkit.train.chunked):
        `chunked_loss: always`, or `auto` where it needs at most half the full-logits loss's memory."""
        mode, head = self.run.cfg.chunked_loss, self._head()
        if head is None or mode == "never":
            return False
        if mode == "always":
            return True
        b, t = batch["input_ids"].shape
        return chunking_helps(
            b * t, head.out_features, head.in_features, trains_head=head.weight.requires_grad
        )

    def _forward(self, batch: Batch, fn: Callable[[Output], Any]) -> Any:
        """`fn` of the model's output for `batch`, with per-conversation positions and block-diagonal
        causal attention found from the restarting positions by the attention implementation
        (chatkit.train.attention): no (T, T) mask from chatkit, none at all with varlen. No KV cache: it
        would turn that detection off (and with gradient checkpointing transformers would warn on
        every rank).

        The output is the logits, or, when chunking helps, the last hidden states and the head: then
        `fn` runs inside the engine's forward, where ZeRO-3 gathers the head weight the chunked loss
        reads by attribute (chatkit.train.chunked.call_in_engine_forward)."""
        kwargs = packed_forward_kwargs(batch["position_ids"], self.run.cfg.attention)
        if not self._chunked(batch):
            return fn(Output(logits=self.engine(input_ids=batch["input_ids"], **kwargs).logits))

        def forward() -> Any:
            model = self.engine.module
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            hidden = hf.base_model(input_ids=batch["input_ids"], **kwargs).last_hidden_state
            head = hf.get_output_embeddings()
            return fn(Output(hidden=hidden, weight=head.weight, bias=head.bias))

        return call_in_engine_forward(self.engine, forward)

    def train_step(self, micro: list[Batch], count: float) -> dict[str, float]:
        # DeepSpeed divides by the accumulation steps and averages over ranks: the scale undoes both.
        method = self.run.method
        scale = step_scale(count, self.dp_world, len(micro))
        sums = torch.zeros(1 + len(method.stat_names), dtype=torch.float64)
        for b in micro:
            b = to_device(b, self.run.device)
            loss_sum, stats = self._forward(b, functools.partial(method.loss, batch=b))
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            sums += torch.cat([loss_sum.detach().reshape(1), stats]).double().cpu()
        return per_unit(method.stat_names, self.dp_sum(sums.tolist()), count)

    def evaluate(self, val_sets: list[TokenizedSet]) -> dict[str, float]:
        """Validation loss (and the method's statistics) per unit over all ranks, one example per row."""
        method, mbs = self.run.method, self.run.cfg.micro_batch_size
        shard = val_shard(val_sets, self.dp_rank, self.dp_world)
        sums = torch.zeros(2 + len(method.stat_names), dtype=torch.float64)
        with self._inference():
            for i in range(0, len(shard), mbs):
                batch = to_device(
                    method.collate([[e] for e in shard[i : i + mbs]], self.run.pad_id), self.run.device
                )
                loss_sum, stats = self._forward(batch, functools.partial(method.loss, batch=batch))
                sums[:-1] += torch.cat([loss_sum.reshape(1), stats]).double().cpu()
                sums[-1] += method.count(batch)
        *totals, count = self.dp_sum(sums.tolist())
        return per_unit(method.stat_names, totals, count)

    def token_logps(self, batch: Batch) -> torch.Tensor:
        """(B, T-1) log-probabilities of `batch`'s next labels without gradients, in eval mode
        (collective under ZeRO-3: every rank calls it as often). The reference pass of preference
        training (chatkit.train.reference) uses it."""
        batch = to_device(batch, self.run.device)
        with self._inference():
            return self._forward(batch, lambda out: out.token_logps(batch["labels"]))

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no gradients for the duration, then training mode again (4-bit layers keep
        their training layout: adapters.keep_training_layout)."""
        self.engine.eval()
        adapters.keep_training_layout(self.engine.module)
        try:
            with torch.no_grad():
                yield
        finally:
            self.engine.train()

    def _same_token(self, token: int) -> int:
        """Rank 0's choice on every rank: ZeRO-3 forwards are collective, so ranks must stop together
        even where their logits differ in the last bit (GPU kernels are not bitwise deterministic)."""
        import torch.distributed as dist

        t = torch.tensor([token], dtype=torch.long, device=self.run.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sample(self, prompts: list[str]) -> list[str]:
        from chatkit.chat import ChatEngine, GenerationParams
        from chatkit.conversation import Message

        run = self.run
        chat = ChatEngine(self.engine.module, run.tokenizer, run.template, run.device, self._same_token)
        adapters.keep_training_layout(self.engine.module)  # ChatEngine put the model in eval mode
        params = GenerationParams(max_new_tokens=64, sample=False)
        try:
            return [chat.reply([Message("user", p)], params) for p in prompts]
        finally:
            self.engine.train()

    def save(self, step: int, epoch: int) -> Path:
        run = self.run
        return checkpoint.save(
            self.engine, run.cfg, run.tokenizer, step, run.rank, {"epoch": epoch}, dp_world=self.dp_world
        )

    def resume(self, root: Path, tag: str) -> int:
        state = checkpoint.load(
            self.engine, root, tag, quantized=bool(self.run.cfg.quantize), dp_world=self.dp_world
        )
        return int(state["step"])

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
