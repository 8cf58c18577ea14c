"""Training configuration: a typed dataclass read from a YAML recipe plus `key=value` overrides.

Every field has a docstring; `validate()` reports every problem at once, before any work starts.
The resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DSCONFIG_DIR = REPO_ROOT / "dsconfig"
MAX_TOKENIZE_PROCS = 256


class ConfigError(ValueError):
    """A recipe or override that cannot be used; lists every problem found."""


def preset_path(name: str) -> Path | None:
    """The file a `deepspeed` setting names: a path to a JSON file, else dsconfig/<name>.json; None if neither."""
    if not name:
        return None
    for path in (Path(name), DSCONFIG_DIR / f"{name}.json"):
        if path.is_file():
            return path
    return None


def known_presets() -> list[str]:
    return sorted(p.stem for p in DSCONFIG_DIR.glob("*.json"))


@dataclass
class TrainConfig:
    model: str = "pretrained/tiny/model"
    """Base model: a Hugging Face folder (see pretrained/<model>/prepare.py)."""
    train_files: list[str] = field(default_factory=list)
    """Conversation JSONL files to train on; `path:weight` entries make a weighted mixture."""
    val_files: list[str] = field(default_factory=list)
    """Conversation JSONL files for validation loss (optional)."""
    method: str = "sft"
    """sft (supervised: conversations) or dpo (preference pairs: chatkit.conversation.Preference)."""
    preference_loss: str = "sigmoid"
    """method=dpo: sigmoid (DPO), ipo, hinge (against the model before training), simpo or orpo
    (reference-free)."""
    beta: float = 0.1
    """method=dpo: the loss's temperature (DPO's beta, IPO's tau, SimPO's beta, ORPO's lambda)."""
    simpo_gamma: float = 0.5
    """preference_loss=simpo: the target reward margin gamma."""
    about: str = ""
    """One line on what the trained model can do, kept in chatkit.json of every checkpoint and export;
    the bot shows it when it starts (the demo lists its four tasks)."""
    template: str = "openchatkit"
    """Chat template name (chatkit.templates); embedded in every export."""
    reasoning: str = "train"
    """An assistant message's `reasoning` where the template renders it (qwen3, hf): train (a trained
    part of the reply) or context (in the text, untrained). Past turns keep, drop or empty it as the
    family's own template does. Recorded in every checkpoint and export."""
    output_dir: str = "outputs/run"
    """Where checkpoints, logs and metrics.jsonl go (not empty)."""
    deepspeed: str = "zero3"
    """DeepSpeed config: a name in dsconfig/ (zero2, zero3, ...) or a path to a JSON file; the pipeline
    engine (pipeline_stages > 1) takes ZeRO stage 0 or 1 only (deepspeed: pipeline)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (DeepSpeed PipelineModule); 1 trains without a pipeline."""
    lora_r: int = 0
    """LoRA rank; 0 fine-tunes every weight."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r); positive."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch, within [0, 1)."""
    lora_targets: list[str] = field(default_factory=list)
    """Module names LoRA adapts (default: the base model's registry entry, else all linear layers)."""
    quantize: str = ""
    """Load the base quantized with bitsandbytes: 4bit (NF4, QLoRA) or 8bit; needs lora_r > 0."""
    optim: str = "adamw"
    """adamw (from the DeepSpeed config) or adamw8bit (bitsandbytes; ZeRO stage 0 only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    max_length: int = 512
    """Sequence length: the longest conversation, and the length of a packed row."""
    overlong: str = "drop"
    """Conversations over max_length: drop, or truncate by whole turns (both are counted)."""
    pack: bool = True
    """Pack whole conversations into rows of max_length (block-diagonal attention keeps them apart)."""
    attention: str = "varlen"
    """Attention implementation (chatkit.train.attention): varlen (default: attention per packed
    conversation with PyTorch's SDPA, no (T, T) mask, memory linear in max_length on CPU and GPU), sdpa
    or eager (transformers builds a dense (T, T) mask per row), flex_attention (block-sparse; no
    backward on CPU), flash_attention_2 (CUDA and the flash-attn package)."""
    chunked_loss: str = "auto"
    """Take the loss from the last hidden states chunk by chunk, never forming the (rows x T x vocab)
    logits (chatkit.train.chunked): auto (where it needs at most half the memory: rows of thousands
    of tokens), always, or never. Gradients equal the plain loss's; the ZeRO engine only (the pipeline
    engine's last stage forms logits)."""
    tokenize_procs: int = 0
    """Processes for tokenization (0: one per CPU core, at most 8); at most 256."""
    cache_dir: str = ""
    """Tokenized-data cache (default: $CHATKIT_CACHE or ~/.cache/chatkit)."""
    micro_batch_size: int = 8
    """Conversations per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    intended_batch: int = 0
    """Rows per optimizer step the recipe's learning rate was chosen for (its source's global batch, on
    its hardware); the launcher warns when micro_batch_size x data-parallel ranks x
    gradient_accumulation_steps comes to another number on the hardware at hand. 0: not stated."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps is 0)."""
    max_steps: int = 0
    """Optimizer steps; overrides epochs when positive."""
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (0 keeps all)."""
    resume: str = ""
    """auto (the latest checkpoint in output_dir, if any) or a checkpoint folder; empty starts fresh."""
    preempt_grace_s: float = 120.0
    """Seconds the run has after SIGTERM or SIGUSR1 (preemption; Slurm: --signal=USR1@120) to finish its
    step, save a checkpoint and exit 0 before the launcher kills it: a step plus a save, with room."""
    collective_timeout_s: float = 600.0
    """Seconds a rank may wait in one collective before the run counts as hung: every rank's Python stack
    and last collective go to the log, and the run exits 1 (0: no watchdog). Longer than a rank ever
    works alone while others wait (rank 0 hashing a large checkpoint's files)."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end, when val_files is set)."""
    log_every: int = 1
    """Log a line every N steps."""
    eval_prompts: list[str] = field(default_factory=list)
    """User turns answered (greedily) at each evaluation; the replies are logged."""
    train_log_backend: list[str] = field(default_factory=lambda: ["loguru"])
    """Where step metrics go besides metrics.jsonl: loguru (train.log) and/or wandb."""
    wandb_project: str = "chatkit"
    """wandb project (WANDB_MODE=offline works without a network)."""
    seed: int = 0
    """Seed for data order and initialisation."""

    def validate(self, check_files: bool = True) -> list[str]:
        """Every problem with these settings, one line each naming the setting (empty: usable).

        `check_files` also checks that the data files exist (the launcher's --dry-run plans without them).
        What depends on the hardware or on the base's folder (precision=fp16 on CPU ranks, pipeline
        stages against the world size, max_length against the context) is checked by the launcher."""
        errors = []
        if not self.train_files:
            errors.append("train_files: at least one training file is required")
        from chatkit.data import DataSource

        for name in ("train_files", "val_files"):
            for spec in getattr(self, name):
                src = DataSource.parse(spec)
                if check_files and not Path(src.path).is_file():
                    errors.append(f"{name}: no such file {src.path!r}")
                if src.weight is not None and not src.weight > 0:
                    errors.append(f"{name}: weight of {src.path!r} must be positive, got {src.weight}")
        if not self.output_dir.strip():
            errors.append("output_dir: must not be empty (the run would write into the current directory)")
        elif check_files and Path(self.output_dir).is_file():
            errors.append(f"output_dir: {self.output_dir!r} is a file, not a folder")
        errors += self._validate_engine()
        errors += self._validate_numbers()
        errors += self._validate_method()
        if self.overlong not in ("drop", "truncate"):
            errors.append(f"overlong: must be drop or truncate, got {self.overlong!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            errors.append(f"precision: must be fp32, bf16 or fp16, got {self.precision!r}")
        from chatkit.templates import list_templates

        if self.template not in list_templates():
            errors.append(
                f"template: unknown chat template {self.template!r}; known: {', '.join(list_templates())}"
            )
        return errors

    def _validate_numbers(self) -> list[str]:
        """Counts and rates (comparisons are written so that NaN fails them too; inf is refused)."""
        errors = []
        for name in ("max_length", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        counts = ("max_steps", "save_every", "eval_every", "warmup_steps", "tokenize_procs", "intended_batch")
        for name in counts:
            if getattr(self, name) < 0:
                errors.append(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.tokenize_procs > MAX_TOKENIZE_PROCS:
            errors.append(f"tokenize_procs: must be at most {MAX_TOKENIZE_PROCS}, got {self.tokenize_procs}")
        if not 0 < self.learning_rate < math.inf:
            errors.append(f"learning_rate: must be positive and finite, got {self.learning_rate}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                errors.append(f"{name}: must be 0 or more and finite, got {getattr(self, name)}")
        if not 0 < self.preempt_grace_s < math.inf:
            errors.append(f"preempt_grace_s: must be positive and finite, got {self.preempt_grace_s}")
        if not 0 <= self.collective_timeout_s < math.inf:
            errors.append(
                f"collective_timeout_s: must be 0 or more and finite, got {self.collective_timeout_s}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio: must be within [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.epochs < math.inf:
            errors.append(f"epochs: must be 0 or more and finite, got {self.epochs}")
        elif self.max_steps == 0 and not self.epochs > 0:
            errors.append("epochs: must be positive when max_steps is 0")
        if not 0 < self.lora_alpha < math.inf:
            errors.append(f"lora_alpha: must be positive and finite, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"lora_dropout: must be within [0, 1), got {self.lora_dropout}")
        return errors

    def _validate_method(self) -> list[str]:
        """The training method and its loss's parameters."""
        from chatkit.train.preference import LOSSES

        if self.method not in ("sft", "dpo"):
            return [f"method: must be sft or dpo, got {self.method!r}"]
        errors = []
        if self.preference_loss not in LOSSES:
            errors.append(
                f"preference_loss: must be one of {', '.join(LOSSES)}, got {self.preference_loss!r}"
            )
        if not 0 < self.beta < math.inf:
            errors.append(f"beta: must be positive and finite, got {self.beta}")
        if not -math.inf < self.simpo_gamma < math.inf:
            errors.append(f"simpo_gamma: must be finite, got {self.simpo_gamma}")
        if self.method == "dpo" and self.pipeline_stages > 1:
            errors.append(
                "method: preference training runs on the ZeRO engine (its losses need every sequence of a "
                "pair on one rank's last layer, with statistics the pipeline engine does not return); "
                "use pipeline_stages=1 with deepspeed=zero3 to shard a large model"
            )
        return errors

    def _validate_engine(self) -> list[str]:
        """Engine, adapter and logging settings (split from validate() to keep each short)."""
        errors = []
        if self.pipeline_stages < 1:
            errors.append(f"pipeline_stages: must be at least 1, got {self.pipeline_stages}")
        if self.lora_r < 0:
            errors.append(f"lora_r: must be 0 or more, got {self.lora_r}")
        if self.quantize not in ("", "4bit", "8bit"):
            errors.append(f"quantize: must be 4bit, 8bit or empty, got {self.quantize!r}")
        if self.quantize and self.lora_r == 0:
            errors.append("quantize: a quantized base cannot be trained directly; set lora_r (QLoRA)")
        if self.optim not in ("adamw", "adamw8bit"):
            errors.append(f"optim: must be adamw or adamw8bit, got {self.optim!r}")
        from chatkit.train.attention import IMPLEMENTATIONS

        if self.reasoning not in ("train", "context"):
            errors.append(f"reasoning: must be train or context, got {self.reasoning!r}")
        if self.chunked_loss not in ("auto", "always", "never"):
            errors.append(f"chunked_loss: must be one of auto, always, never, got {self.chunked_loss!r}")
        if self.attention not in IMPLEMENTATIONS:
            errors.append(f"attention: must be one of {', '.join(IMPLEMENTATIONS)}, got {self.attention!r}")
        if (self.lora_r or self.quantize) and self.pipeline_stages > 1:
            errors.append(
                "pipeline_stages: LoRA and quantized bases train with ZeRO, not the pipeline engine"
            )
        errors += self._validate_preset()
        unknown = set(self.train_log_backend) - {"loguru", "wandb"}
        if unknown:
            errors.append(f"train_log_backend: unknown {', '.join(sorted(unknown))} (loguru, wandb)")
        if self.keep_checkpoints < 0:
            errors.append(f"keep_checkpoints: must be 0 or more, got {self.keep_checkpoints}")
        return errors

    def _validate_preset(self) -> list[str]:
        """The DeepSpeed preset exists, is a JSON object, and its ZeRO stage suits the engine."""
        path = preset_path(self.deepspeed)
        if path is None:
            return [
                f"deepspeed: no preset {self.deepspeed!r}: give a name in dsconfig/ "
                f"({', '.join(known_presets())}) or a path to a JSON file"
            ]
        try:
            preset = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return [f"deepspeed: {path} is not readable JSON ({' '.join(str(e).split())})"]
        zero = preset.get("zero_optimization", {}) if isinstance(preset, dict) else None
        if not isinstance(zero, dict):
            return [f"deepspeed: {path} is not a DeepSpeed config (a JSON object)"]
        stage = zero.get("stage", 0)
        errors = []
        if self.pipeline_stages > 1 and stage not in (0, 1):
            errors.append(
                f"pipeline_stages: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, and "
                f"deepspeed={self.deepspeed} is stage {stage}; use deepspeed=pipeline"
            )
        if self.quantize and stage == 3:
            errors.append("deepspeed: a quantized base cannot be partitioned by ZeRO-3; use zero0 or zero2")
        if self.optim == "adamw8bit" and stage != 0:
            errors.append(f"optim: adamw8bit needs ZeRO stage 0 (deepspeed=zero0), not stage {stage}")
        return errors


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert a YAML value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(name, args[0], value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")


def read_config(
    path: str | None, overrides: list[str] = (), check_files: bool = True
) -> tuple[TrainConfig, list[str], set[str]]:
    """A YAML recipe with `key=value` overrides applied: (the config, every problem with it, one line each
    naming the setting, and the settings whose given value could not be read: their defaults stand in).

    Raises ConfigError only when the recipe or an override cannot be read at all."""
    raw: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            raw[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: not a YAML value ({e.problem}); quote it, e.g. key='[\"a b?\"]'"
            ) from None
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    errors, values, unread = [], {}, set()
    for key, value in raw.items():
        if key not in known:
            errors.append(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
            continue
        try:
            values[key] = _coerce(key, hints[key], value)
        except ConfigError as e:
            errors.append(str(e))
            unread.add(key)
    cfg = TrainConfig(**values)
    errors += cfg.validate(check_files)
    return cfg, errors, unread


def config_error(path: str | None, errors: list[str]) -> str:
    """The problems of a config as one message: a heading naming the recipe, then one problem a line."""
    where = f" in {path}" if path else ""
    return f"invalid training config{where}:\n  " + "\n  ".join(errors)


def load_config(path: str | None, overrides: list[str] = (), check_files: bool = True) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` overrides, validate; raise ConfigError listing all problems."""
    cfg, errors, _ = read_config(path, overrides, check_files)
    if errors:
        raise ConfigError(config_error(path, errors))
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    from chatkit.io import atomic_open

    with atomic_open(path) as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
