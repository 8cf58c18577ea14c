"""Training: one loop over two engines.

run.py        a run from a config: process group, run context, engine, data, then the loop
context.py    Run: config, rank, device, tokenizer, template, method, in one object
data.py       tokenized sets (cached), each replica's batch stream, validation shards
method.py     a training method = collate + loss + count (SFT; preference methods plug in here)
loss.py       token loss, trained-token count, step scaling; Output: logits or hidden states + head
chunked.py    the loss and log-probabilities from hidden states chunk by chunk, never all logits
preference.py DPO, IPO, hinge, SimPO, ORPO; reference.py the reference log-probabilities, once
attention.py  padding-free packed attention (varlen), the attention implementation of a run
loop.py       fit(): the loop, the same for every engine and method
engine.py     the Engine protocol the loop uses
zero.py       ZeRO 0-3 engine (full, LoRA, QLoRA)
pipeline.py   pipeline x data parallel engine; pipeline_model.py wraps a HF model as its layers
adapters.py   LoRA/QLoRA, 8-bit AdamW
checkpoint.py atomic checkpoints, resume; monitor.py metrics, wandb, curves
dsconfig.py   DeepSpeed presets with "auto" filled; the learning-rate schedule
distributed.py process group and per-rank logging
preflight.py  before step 1: the backend answers, every rank runs the same code and config, disk room
watchdog.py   a collective past collective_timeout_s: every rank's stack to the log, the run ends
preemption.py SIGTERM/SIGUSR1: every rank finishes its step, saves, exits 0
"""
