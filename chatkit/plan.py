"""What a run will take, from the resolved config and the model registry alone (no weights, no data).

`chatkit.launch --dry-run` prints it: world size, pipeline x data parallelism, global batch, tokens
per step, precision, ZeRO stage, adapters, the parameters that train, and an estimate of the memory
each GPU (or CPU rank) needs for the weights, the gradients and the Adam states; then, each on a line,
the host RAM a rank needs while the model loads (by how it loads: a pipeline stage's share, ZeRO-3's
partitioned load, a full replica), the activations one micro-batch keeps (Korthikanti et al. 2022),
and what a checkpoint takes on disk. The parameters are counted in the model folder's safetensors headers when the folder is
here (else its config.json's shape, else the registry's figure). Warnings: a global batch other than
the recipe's `intended_batch` (the learning rate was chosen for that one), and an estimate above the
memory a rank has (the largest GPU torch reports; 80 GiB, an A100's or H100's, when planning for GPUs
this machine lacks; for CPU ranks, this machine's memory shared among them).

LoRA targets are decided as training decides them (`chatkit.architectures.resolve_lora_targets`), and
counted with the family's record (`Architecture.lora_params`, r x (in + out) per adapted module, as PEFT
builds them): the count printed is the count of `requires_grad` parameters training will report.

The estimate is the ZeRO paper's (Rajbhandari et al., 2020): per trained parameter, w bytes of
weights, g of gradients and o of optimizer states: bf16/fp16 training keeps 2 + 2 + 12 (fp32
master copy, Adam m and v), fp32 training 4 + 4 + 8; 8-bit AdamW stores m and v in 1 byte each.
Stage 1 shards o over the data-parallel ranks, stage 2 also g, stage 3 also w; offload moves o (and,
for zero3_offload, w) to CPU memory. A pipeline stage holds 1/stages of the model. A frozen LoRA
base costs its weights only: 0.5 bytes a parameter in 4-bit NF4, 1 in 8-bit, else w.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatkit.architectures import ARCHITECTURES, get_architecture, resolve_lora_targets
from chatkit.config import TrainConfig, preset_path
from chatkit.models import ModelSpec, spec_for_path

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
ASSUMED_GPU = 80 * GIB
"""A GPU's memory when planning for GPUs this machine lacks: the largest A100's and H100's."""


@dataclass(frozen=True)
class World:
    ranks: int
    nodes: int
    per_node: int
    gpu: bool


def ds_preset(name: str) -> dict:
    """The DeepSpeed preset a recipe names (dsconfig/<name>.json or a path); {} when there is none."""
    path = preset_path(name)
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def base_config(model: str) -> dict[str, Any] | None:
    """A recipe's base as a Hugging Face config (with `model_type`): its registry entry's shape, else its
    folder's config.json (a base not in the registry); None when neither is there."""
    spec = spec_for_path(model)
    if spec is not None:
        return {"model_type": spec.architecture, **spec.config}
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("model_type"), str) else None


def safetensors_params(model: str) -> tuple[int, str] | None:
    """Parameters stored in a model folder's safetensors files, summed from their headers (shapes only,
    no weights read), and what was read; None when the folder has none, or one cannot be read."""
    folder = Path(model)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:  # adapter_model.safetensors (a LoRA checkpoint's) holds no base weights
            files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_"))
        if not files:
            return None
        total = 0
        for path in files:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= 256 * 1024**2:
                    return None
                header = json.loads(f.read(size))
            total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return total, str(files[0]) if len(files) == 1 else f"the {len(files)} safetensors files of {model}"


def param_count(model: str, spec: ModelSpec | None, config: dict[str, Any] | None) -> tuple[int | None, str]:
    """The base's parameter count and where it comes from: the folder's safetensors headers when the
    folder is here, else the shape in its config.json, else the registry entry's figure."""
    counted = safetensors_params(model)
    if counted:
        return counted[0], f"counted in {counted[1]}"
    if (Path(model) / "config.json").is_file() and _countable(config):
        estimate = get_architecture(config["model_type"]).nominal_params(config)
        return estimate, "an estimate from its config.json"
    if spec is not None:
        why = "" if Path(model).is_dir() else ": the folder is not here"
        return nominal_params(spec), f"the registry's figure{why}"
    return None, ""


def device_memory(world: World) -> tuple[float, str]:
    """The memory one rank has, and how it is known: the largest GPU torch reports, or ASSUMED_GPU when
    planning for GPUs this machine lacks; for CPU ranks, this machine's memory over its ranks."""
    if world.gpu:
        try:
            import torch

            gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        except Exception:
            gpus = []
        if gpus:
            best = max(gpus, key=lambda g: g.total_memory)
            return best.total_memory, f"the {_size(best.total_memory)} of the largest GPU here ({best.name})"
        return ASSUMED_GPU, f"{_size(ASSUMED_GPU)}, an A100's or H100's (no GPU here to ask)"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf, ""
    return total / world.per_node, f"this machine's {_size(total)} shared by {world.per_node} rank(s)"


def memory_remedies(cfg: TrainConfig, world: World) -> str:
    """What would lower the estimate, among what the config does not do already."""
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {})
    ways = []
    if cfg.pipeline_stages == 1 and zero.get("stage", 0) < 3 and not cfg.quantize:
        ways.append("shard the weights too (deepspeed=zero3)")
    if cfg.pipeline_stages == 1 and "offload_optimizer" not in zero and cfg.optim != "adamw8bit":
        ways.append("offload to CPU memory (deepspeed=zero3_offload or zero2_offload)" if world.gpu else "")
    ways.append("more GPUs (or nodes)" if world.gpu else "more machines (--hostfile)")
    if not cfg.lora_r:
        ways.append("train adapters on a frozen base (lora_r, quantize)")
    return "it would run out of memory: " + ", ".join(w for w in ways if w)


def batch_warning(cfg: TrainConfig, dp: int, batch: int) -> str:
    """The global batch differs from the one the recipe's learning rate was chosen for."""
    want, per = cfg.intended_batch, cfg.micro_batch_size * dp
    if want % per == 0:
        fix = f"gradient_accumulation_steps={want // per} keeps it"
    else:
        fix = f"set micro_batch_size and gradient_accumulation_steps so that micro x {dp} DP x accumulation = {want}"
    return (
        f"warning: global batch {batch} rows, not the {want} this recipe was made for (intended_batch), "
        f"with the learning_rate ({cfg.learning_rate:g}) chosen for {want}: {fix}, or scale learning_rate"
    )


def nominal_params(spec: ModelSpec) -> int:
    """The card's parameter count, or the record's count from the entry's shape (the tiny models)."""
    return spec.params or get_architecture(spec.architecture).nominal_params(spec.config)


def trainable_params(cfg: TrainConfig, config: dict[str, Any]) -> tuple[int, list[str]]:
    """LoRA parameters training will make trainable on a base of `config`, and the targets among
    `resolve_lora_targets`'s that the count leaves out (no linear module of a decoder layer has that name)."""
    arch = get_architecture(config["model_type"])
    targets = resolve_lora_targets(cfg, arch.model_type)
    shapes = arch.linear_shapes(config)
    known = [t for t in targets if t in shapes]
    unknown = [t for t in targets if t not in shapes]
    return (arch.lora_params(config, cfg.lora_r, known) if known else 0), unknown


def _countable(config: dict[str, Any] | None) -> bool:
    """Whether the records can count `config`'s parameters: a known family, the shape keys there."""
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    return bool(config) and config["model_type"] in ARCHITECTURES and all(k in config for k in keys)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def memory_per_gpu(cfg: TrainConfig, params: int, trainable: int, dp: int) -> tuple[dict[str, float], str]:
    """Bytes per GPU for weights, gradients and optimizer states, and the formula that gave them."""
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {})
    stage = zero.get("stage", 0)
    w = g = 4 if cfg.precision == "fp32" else 2
    o = (2 if cfg.optim == "adamw8bit" else 8) + (0 if cfg.precision == "fp32" else 4)
    p = cfg.pipeline_stages
    shard_o = dp if stage >= 1 else 1
    shard_g = dp if stage >= 2 else 1
    shard_w = dp if stage >= 3 else 1
    opt_on_gpu = 0 if "offload_optimizer" in zero else 1
    w_on_gpu = 0 if "offload_param" in zero else 1
    if cfg.lora_r:
        base_bytes = {"4bit": 0.5, "8bit": 1.0}.get(cfg.quantize, w)
        weights = params * base_bytes / (shard_w if not cfg.quantize else 1) + trainable * w / shard_w
        formula = (
            f"base {base_bytes:g} B x {_count(params)}{f' / {shard_w} (ZeRO-3)' if shard_w > 1 else ''}"
            f" + LoRA ({w} + {g} + {o} B) x {_count(trainable)}"
        )
    else:
        weights = params * w / (p * shard_w)
        formula = f"({w} + {g} + {o} B) x {_count(params)}{f' / {p} stages' if p > 1 else ''}"
    n = trainable / p
    mem = {"weights": weights * w_on_gpu, "grads": n * g / shard_g, "optimizer": n * o / shard_o * opt_on_gpu}
    if stage:
        formula += f", ZeRO-{stage} over {dp} data-parallel rank(s)"
    if not opt_on_gpu:
        formula += ", optimizer states offloaded to CPU"
    return mem, formula


def partition_balanced(weights: list[float], parts: int) -> list[int]:
    """Stage boundaries [0, ..., n] for layers of these `weights`: DeepSpeed's `partition_balanced`
    (deepspeed.runtime.utils, its `partition_method: parameters`), the contiguous split whose heaviest
    and lightest runs differ least, ties broken as it breaks them. Written out so a dry run does not
    import DeepSpeed; tests/test_plan_memory.py checks that the two agree."""
    n = len(weights)
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    prefix = [0.0, *itertools.accumulate(float(w) for w in weights)]
    top = [[math.inf] * (parts + 1) for _ in range(n + 1)]
    low = [[math.inf] * (parts + 1) for _ in range(n + 1)]
    cost = [[math.inf] * (parts + 1) for _ in range(n + 1)]
    cut = [[0] * (parts + 1) for _ in range(n + 1)]
    top[0][0] = cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                run = prefix[i] - prefix[k]
                hi, lo = max(top[k][j - 1], run), min(low[k][j - 1], run)
                if cost[i][j] >= hi - lo:
                    cost[i][j], top[i][j], low[i][j], cut[i][j] = hi - lo, hi, lo, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return bounds[::-1]


def pipeline_layer_params(config: dict[str, Any]) -> list[int]:
    """Parameters of each pipeline layer as chatkit.train.pipeline_model lays them out (embedding,
    decoder layers, final norm, head; a tied head counts the embedding again, as DeepSpeed counts it),
    from the weight matrices (biases and norms, under 0.1%, left out; the norm counts its h weights)."""
    arch = get_architecture(config["model_type"])
    h, vocab = config["hidden_size"], config.get("vocab_size", 1024)
    layer = sum(i * o for i, o in arch.linear_shapes(config).values())
    return [vocab * h, *[layer] * config["num_hidden_layers"], h, vocab * h]


def _bytes_name(b: float) -> str:
    return {0.5: "4-bit", 1: "8-bit", 2: "16-bit", 4: "fp32"}.get(b, f"{b:g}-byte")


def load_ram(
    cfg: TrainConfig, config: dict[str, Any] | None, params: int, world: World, dp: int
) -> tuple[dict[str, float], str]:
    """Host RAM a rank needs while the model loads, by rank ('each' or 'rank 0' / 'others'), and why.

    - a pipeline stage builds the model on the meta device and reads its own layers only, one tensor
      at a time (chatkit.train.pipeline_model): the largest stage's share in the training dtype, plus
      the largest tensor (the embedding) while it is read;
    - ZeRO-3 (full or LoRA, not quantized) builds the model inside zero.Init: transformers 5 reads the
      whole checkpoint on rank 0 and hands each rank its partition (`_load_state_dict_into_zero3_model`);
      the partition stays in host RAM only on CPU ranks or with parameter offload;
    - otherwise every rank loads the whole model (a full replica) in the training dtype; a quantized
      base (bitsandbytes) is quantized on the GPU tensor by tensor, or held quantized on a CPU rank.
    """
    w = 4 if cfg.precision == "fp32" else 2
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {})
    name = f"in {cfg.precision}"
    if cfg.pipeline_stages > 1 and config and _countable(config):
        layers = pipeline_layer_params(config)
        bounds = partition_balanced(layers, cfg.pipeline_stages)
        share = max(sum(layers[a:b]) for a, b in itertools.pairwise(bounds))
        tensor = config.get("vocab_size", 1024) * config["hidden_size"]
        why = (
            f"pipeline stage share: the largest stage holds {_count(share)} of {_count(params)} parameters {name}, "
            f"read one tensor at a time (+ the {_count(tensor)}-parameter embedding while it is read)"
        )
        return {"each": (share + tensor) * w}, why
    if cfg.pipeline_stages > 1:  # a family without a record: an even split
        return {
            "each": params * w / cfg.pipeline_stages
        }, f"pipeline stage share: about 1/{cfg.pipeline_stages} {name}"
    if zero.get("stage") == 3 and not cfg.quantize:
        stored = _checkpoint_bytes(config, w)
        on_host = not world.gpu or "offload_param" in zero
        part = params * w / dp if on_host else 0.0
        where = "which stays in host RAM" if on_host else "which goes to its GPU"
        why = (
            f"ZeRO-3 partitioned load: each rank keeps 1/{dp} of the weights {name} ({where}); transformers "
            f"reads the whole checkpoint on rank 0 ({_bytes_name(stored)} as stored) and scatters it"
        )
        return {"rank 0": params * stored + part, "others": part}, why
    if cfg.quantize:
        b = {"4bit": 0.5, "8bit": 1.0}[cfg.quantize]
        if world.gpu and config and "hidden_size" in config:
            tensor = config.get("vocab_size", 1024) * config["hidden_size"] * _checkpoint_bytes(config, w)
            why = "full replica, quantized on the GPU as each tensor loads (the largest, the embedding, in host RAM)"
            return {"each": tensor}, why
        return {"each": params * b}, f"full replica, held quantized ({_bytes_name(b)}) on each CPU rank"
    return {"each": params * w}, f"full replica: every rank loads the whole model {name}"


def _checkpoint_bytes(config: dict[str, Any] | None, default: float) -> float:
    """Bytes a parameter of the base's files, from config.json's dtype when it names one."""
    dtype = str((config or {}).get("dtype") or (config or {}).get("torch_dtype") or "")
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype.removeprefix("torch."), default)


def activation_memory(cfg: TrainConfig, config: dict[str, Any]) -> Activations:
    """The activations one micro-batch keeps for the backward pass, per decoder layer and in the loss's
    logits. Rows are max_length long (packed rows are, about).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1:
    a GPT layer keeps s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations (s tokens, b rows, h wide, a
    heads): attention 11sbh + 5as^2b, MLP 19sbh, layer norms 4sbh (dropout masks counted, a byte
    each). Here the MLP's 19sbh is written for any width i: 3sbh + 2*k*s*b*i, with k the i-wide
    tensors autograd keeps (GELU: 2; SwiGLU: 4, gate, up, SiLU(gate) and their product), which gives
    the paper's 19 for i = 4h; the 5as^2b scores only with eager attention (sdpa, varlen and
    FlashAttention keep no (s, s) matrix); fp32 training doubles it. With full activation
    recomputation (gradient_checkpointing) a layer keeps its 2sbh input (the paper's section 5) and
    one layer at a time is rebuilt. The loss keeps the logits in fp32, 4sbv (the paper's section 4.3);
    chunked_loss avoids most of that in the ZeRO engine.
    """
    s, b = cfg.max_length, cfg.micro_batch_size
    h, n, a = config["hidden_size"], config["num_hidden_layers"], config.get("num_attention_heads") or 1
    i, v = config["intermediate_size"], config.get("vocab_size", 1024)
    k = 2 if get_architecture(config["model_type"]).mlp_matrices == 2 else 4
    scale = 2 if cfg.precision == "fp32" else 1
    scores = 5 * a * s * s * b if cfg.attention == "eager" else 0
    full = (s * b * h * 18 + 2 * k * s * b * i + scores) * scale  # one layer, nothing recomputed
    terms = f"sbh(18 + {2 * k}i/h){' + 5as^2b' if scores else ''}{' x2 (fp32)' if scale == 2 else ''}"
    if cfg.gradient_checkpointing:
        kept = 2 * s * b * h * scale
        return Activations(
            kept, full, 4 * s * b * v, n, f"per layer its input 2sbh; one layer rebuilt, {terms}"
        )
    return Activations(full, 0, 4 * s * b * v, n, f"per layer {terms}")


@dataclass(frozen=True)
class Activations:
    """What one micro-batch keeps for the backward pass (bytes; see `activation_memory`)."""

    per_layer: float
    rebuilt: float
    """One layer's full activations, rebuilt during the backward pass under gradient checkpointing."""
    logits: float
    layers: int
    formula: str

    def total(self, layers: int | None = None, logits: bool = True) -> float:
        """`layers` decoder layers' worth (default: all), plus the logits unless told otherwise."""
        n = self.layers if layers is None else layers
        return n * self.per_layer + (self.rebuilt if n else 0) + (self.logits if logits else 0)


def checkpoint_size(cfg: TrainConfig, params: int, trainable: int) -> tuple[dict[str, float], str]:
    """Bytes one checkpoint takes on disk: {'weights', 'optimizer'}, and where they go.

    DeepSpeed writes the module's state dict once (the first data-parallel rank, per stage): every
    weight in the training dtype (a LoRA base too, quantized if it is), except under ZeRO-3, whose
    module files hold only placeholders for the partitioned weights. The optimizer states cover the
    weights that train: Adam's m and v (4 + 4 bytes, 1 + 1 for 8-bit AdamW) and the fp32 master copy
    (4 bytes) for 16-bit training and at every ZeRO stage >= 1 (ZeRO keeps its own fp32 partition even
    in fp32 training); ZeRO-1/2/3 split them into one file per data-parallel rank, ZeRO-0 writes one copy.
    """
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0)
    w = 4 if cfg.precision == "fp32" else 2
    base = {"4bit": 0.5, "8bit": 1.0}.get(cfg.quantize, w) if cfg.lora_r else w
    weights = 0.0 if zero == 3 else (params * base + (trainable * w if cfg.lora_r else 0))
    if cfg.lora_r:
        weights += trainable * w  # adapter_model.safetensors beside DeepSpeed's files
    moments = 2 if cfg.optim == "adamw8bit" else 8
    master = 4 if cfg.precision != "fp32" or zero >= 1 else 0
    optimizer = trainable * (moments + master)
    split = "one optimizer file per data-parallel rank" if zero else "one copy"
    where = "weights in the optimizer's fp32 partitions" if zero == 3 else f"weights {cfg.precision}"
    return {"weights": weights, "optimizer": optimizer}, (
        f"ZeRO-{zero}: {where}; optimizer {moments + master} B x {_count(trainable)} trained, {split}"
    )


def memory_lines(
    cfg: TrainConfig, config: dict[str, Any] | None, total: int, trainable: int, world: World, dp: int
) -> list[str]:
    """Load-time host RAM, activations per micro-batch, checkpoint size: the plan's lines for them."""
    ram, why = load_ram(cfg, config, total, world, dp)
    if "each" in ram:
        per = f"{_size(ram['each'])} on each rank"
    else:
        per = f"rank 0 {_size(ram['rank 0'])}, each other rank {_size(ram['others'])}"
    lines = [f"host RAM at load: {per}; {why}"]
    if "each" in ram and world.per_node > 1:
        lines[0] += f"; {_size(ram['each'] * world.per_node)} for the node's {world.per_node} ranks"
    if _countable(config):
        act = activation_memory(cfg, config)
        stage = ""
        if cfg.pipeline_stages > 1:  # 1F1B: stage 0 has up to `stages` micro-batches in flight
            first = partition_balanced(pipeline_layer_params(config), cfg.pipeline_stages)[1] - 1
            flight = min(cfg.pipeline_stages, cfg.gradient_accumulation_steps)
            held = act.total(first, logits=False) * flight
            stage = f"; the first stage ({first} layers) keeps {flight} in flight (1F1B): {_size(held)}"
        lines.append(
            f"activations per micro-batch ({cfg.micro_batch_size} x {cfg.max_length}): {_size(act.total())} = "
            f"{act.layers} layers {_size(act.total(logits=False))} + logits {_size(act.logits)}; {act.formula}, "
            f"logits 4sbv in fp32 (Korthikanti et al. 2022){stage}"
        )
    disk, where = checkpoint_size(cfg, total, trainable)
    keep = f"; keep_checkpoints={cfg.keep_checkpoints} keeps at most {_size(sum(disk.values()) * cfg.keep_checkpoints)}"
    lines.append(
        f"checkpoint on disk: {_size(sum(disk.values()))} a save = weights {_size(disk['weights'])} + "
        f"optimizer {_size(disk['optimizer'])}; {where}{keep if cfg.keep_checkpoints else ''}"
    )
    return lines


def plan_lines(cfg: TrainConfig, world: World, memory: tuple[float, str] | None = None) -> list[str]:
    """The plan, a line each; `memory`: what one rank has (default: `device_memory(world)`)."""
    spec = spec_for_path(cfg.model)
    stages = cfg.pipeline_stages
    dp = max(1, world.ranks // stages)
    unit = "GPU" if world.gpu else "rank"
    where = (
        f"{world.per_node} GPU(s) x {world.nodes} node(s)" if world.gpu else f"{world.per_node} CPU rank(s)"
    )
    if not world.gpu and world.nodes > 1:
        where = f"{world.per_node} CPU rank(s) x {world.nodes} node(s)"
    config = base_config(cfg.model)
    model_type = config["model_type"] if config else None
    countable = _countable(config)
    total, source = param_count(cfg.model, spec, config)
    if spec is None:
        family = f"{model_type}, " if model_type else ""
        if total is None:
            size = "size unknown, no memory estimate"
        elif source.startswith("an estimate"):
            size = f"about {_count(total)} parameters by its config.json"
        else:
            size = f"{_count(total)} parameters, {source}"
        lines = [f"model: {cfg.model} ({family}not in chatkit.models: {size})"]
    else:
        hub = f"{spec.hf_id}, " if spec.hf_id else ""
        lines = [f"model: {spec.name} ({hub}{spec.architecture}), {_count(total)} parameters ({source})"]
        if spec_for_path(str(Path(cfg.model).parent)) is None and Path(cfg.model).name == "hf":
            lines[0] = (
                f"model: {cfg.model}, the export of a {spec.name} run ({spec.architecture}), "
                f"{_count(total)} parameters ({source})"
            )
    lines.append(f"world: {world.ranks} rank(s) = {where}")
    lines.append(f"parallelism: {stages} pipeline stage(s) x {dp} data-parallel")
    if world.ranks % stages:
        lines.append(
            f"warning: pipeline_stages={stages} needs a multiple of {stages} ranks, this launch has {world.ranks}"
            f" (plan for other hardware with --num-gpus N, or set pipeline_stages)"
        )
    gas, micro = cfg.gradient_accumulation_steps, cfg.micro_batch_size
    batch = micro * dp * gas
    intended = ""
    if cfg.intended_batch:
        same = batch == cfg.intended_batch
        intended = f", {'as' if same else 'not'} the recipe's {cfg.intended_batch} (intended_batch)"
    lines.append(
        f"global batch: {micro} micro x {dp} DP x {gas} accumulation = {batch} rows of {cfg.max_length}{intended}"
    )
    if cfg.intended_batch and batch != cfg.intended_batch:
        lines.append(batch_warning(cfg, dp, batch))
    tokens = batch * cfg.max_length
    lines.append(
        f"tokens per step: {batch} x {cfg.max_length} = {tokens:,} at most "
        + ("(packed rows are nearly full)" if cfg.pack else "(one conversation a row: the rest is padding)")
    )
    stage = ds_preset(cfg.deepspeed).get("zero_optimization", {}).get("stage", "?")
    lines.append(
        f"precision: {cfg.precision}; deepspeed: {cfg.deepspeed} (ZeRO stage {stage}); optimizer: {cfg.optim}"
    )
    trainable = total
    if cfg.lora_r:
        kind = f"QLoRA ({cfg.quantize} base)" if cfg.quantize else "LoRA"
        targets = resolve_lora_targets(cfg, model_type)  # what training passes to PEFT
        named = (
            ",".join(targets)
            if isinstance(targets, list)
            else f"{targets} (PEFT's: every linear layer but the head)"
        )
        lines.append(
            f"adapters: {kind} r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} on {named}"
        )
        if countable and total:
            trainable, unknown = trainable_params(cfg, config)
            if unknown:
                lines.append(
                    f"warning: lora_targets {unknown}: no linear module of a {model_type} decoder layer has that "
                    "name; they are left out of the count (PEFT adapts whatever module of that name it finds, "
                    "and stops when no target matches)"
                )
            lines.append(
                f"trainable: {trainable:,} of {_count(total)} parameters ({100 * trainable / total:.3g}%)"
            )
        else:
            if not model_type:
                why = "the base's family is unknown: not in chatkit.models, no config.json"
            elif model_type not in ARCHITECTURES:
                why = f"chatkit.architectures has no record of {model_type!r}"
            else:
                why = "the base's config.json lacks its shape"
            lines.append(f"trainable: unknown ({why})")
            trainable = None
    else:
        lines.append("adapters: none (every weight trains)")
        lines.append(f"trainable: every weight{f', {_count(total)} parameters' if total else ''}")
    if cfg.max_steps:
        lines.append(
            f"steps: {cfg.max_steps:,} (max_steps) = {_count(cfg.max_steps * tokens)} tokens at most"
        )
    else:
        lines.append(
            f"steps: {cfg.epochs:g} epoch(s); the count depends on the data (see the run's first log line)"
        )
    if total is not None and trainable is not None:
        mem, formula = memory_per_gpu(cfg, total, trainable, dp)
        parts = " + ".join(f"{k} {_size(v)}" for k, v in mem.items())
        need = sum(mem.values())
        lines.append(f"memory per {unit}: {_size(need)} = {parts}; {formula}; activations not included")
        limit, what = memory or device_memory(world)
        if need > limit:
            lines.append(
                f"warning: the memory per {unit} estimated ({_size(need)}, before activations) exceeds {what}; "
                f"{memory_remedies(cfg, world)}"
            )
        lines += memory_lines(cfg, config, total, trainable, world, dp)
    if cfg.method == "dpo":
        lines.append(preference_line(cfg, total, dp, unit))
    return lines


def preference_line(cfg: TrainConfig, params: int | None, dp: int, unit: str = "GPU") -> str:
    """What preference training adds: for the reference-based losses, one scoring pass before step 1
    and 16 bytes a pair; the memory a second, frozen reference model would take is not spent."""
    head = f"method: dpo, {cfg.preference_loss} loss, beta={cfg.beta:g}; rows hold whole pairs (chosen + rejected)"
    if cfg.preference_loss in ("simpo", "orpo"):
        return f"{head}; reference-free: no reference pass"
    stage = ds_preset(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0)
    saved = ""
    if params:
        frozen = params * {"4bit": 0.5, "8bit": 1.0}.get(cfg.quantize, 4 if cfg.precision == "fp32" else 2)
        shard = dp if stage == 3 and not cfg.quantize else 1
        saved = f" (a frozen reference model would add {_size(frozen / shard)} per {unit})"
    return (
        f"{head}; reference: the starting model scores every pair once before step 1 (about a third of "
        f"an epoch's compute), kept as 16 bytes a pair and cached; memory per {unit} above includes it: "
        f"no second model{saved}"
    )
