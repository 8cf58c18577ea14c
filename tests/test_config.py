"""Training config: YAML + key=value overrides, validation that reports every problem, the DeepSpeed
preset resolution and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from chatkit.config import ConfigError, TrainConfig, load_config, save_config
from chatkit.train.dsconfig import lr_lambda, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "config").glob("*.yaml"))
DS_PRESETS = sorted((REPO / "dsconfig").glob("*.json"))


@pytest.fixture
def data_files(tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (a, b):
        f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    return str(a), str(b)


@pytest.fixture
def recipe(tmp_path: Path, data_files: tuple[str, str]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train_files": [data_files[0]],
                "micro_batch_size": 4,
                "learning_rate": 0.002,
                "precision": "fp32",
                "output_dir": str(tmp_path / "out"),
            }
        ),
        encoding="utf-8",
    )
    return path


def _errors(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


# --- reading YAML and overrides -------------------------------------------------------------------


def test_yaml_is_read_and_defaults_fill_the_rest(recipe: Path, data_files):
    cfg = load_config(str(recipe))
    assert cfg.train_files == [data_files[0]]
    assert cfg.micro_batch_size == 4 and isinstance(cfg.micro_batch_size, int)
    assert cfg.learning_rate == 0.002
    # Untouched fields keep the dataclass defaults.
    assert cfg.gradient_accumulation_steps == TrainConfig.gradient_accumulation_steps
    assert cfg.template == "openchatkit"


def test_overrides_are_yaml_typed(recipe: Path):
    cfg = load_config(
        str(recipe),
        ["micro_batch_size=16", "learning_rate=3.0e-3", "epochs=2", "min_lr_ratio=0.5", "precision=bf16"],
    )
    assert cfg.micro_batch_size == 16 and type(cfg.micro_batch_size) is int
    assert cfg.learning_rate == pytest.approx(3.0e-3) and type(cfg.learning_rate) is float
    # An int given for a float field becomes a float.
    assert cfg.epochs == 2.0 and type(cfg.epochs) is float
    assert cfg.min_lr_ratio == 0.5
    assert cfg.precision == "bf16"


def test_override_whitespace_around_key_and_value(recipe: Path):
    cfg = load_config(str(recipe), [" max_steps = 12"])
    assert cfg.max_steps == 12


@pytest.mark.parametrize(
    ("value", "expected"), [("3e-4", 3e-4), ("1e-4", 1e-4), ("3.0e3", 3000.0), ("2E-5", 2e-5)]
)
def test_override_floats_in_exponent_form(recipe: Path, value: str, expected: float):
    # YAML 1.1 alone reads "3e-4" (no dot) as a string; a float setting must still take it.
    cfg = load_config(str(recipe), [f"learning_rate={value}"])
    assert cfg.learning_rate == pytest.approx(expected) and type(cfg.learning_rate) is float


def test_recipe_float_in_exponent_form(tmp_path: Path, data_files):
    path = tmp_path / "r.yaml"
    path.write_text(f"train_files: [{data_files[0]}]\nlearning_rate: 1e-4\n", encoding="utf-8")
    assert load_config(str(path)).learning_rate == pytest.approx(1e-4)


def test_exponent_form_is_not_taken_for_int_settings(recipe: Path):
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_config(str(recipe), ["max_steps=1e3"])


@pytest.mark.parametrize(
    "override", ["learning_rate=.nan", "epochs=.nan", "grad_clip=-1", "weight_decay=-0.1"]
)
def test_nan_and_negative_values_are_rejected(recipe: Path, override: str):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(str(recipe), [override])


def test_list_override_flow_form(recipe: Path, data_files):
    a, b = data_files
    cfg = load_config(str(recipe), [f"train_files=[{a},{b}]"])
    assert cfg.train_files == [a, b]


def test_list_override_comma_form(recipe: Path, data_files):
    a, b = data_files
    cfg = load_config(str(recipe), [f"train_files={a},{b}", f"val_files={b}"])
    assert cfg.train_files == [a, b]
    assert cfg.val_files == [b]


def test_overrides_apply_in_order_last_wins(recipe: Path):
    cfg = load_config(str(recipe), ["max_steps=3", "max_steps=9"])
    assert cfg.max_steps == 9


def test_no_recipe_only_overrides(data_files):
    cfg = load_config(None, [f"train_files={data_files[0]}", "seed=7"])
    assert cfg.seed == 7 and cfg.train_files == [data_files[0]]


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_key_is_named_with_known_keys(recipe: Path):
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), ["bogus=1"])
    msg = _errors(e)
    assert "bogus: unknown setting" in msg
    assert "micro_batch_size" in msg  # the known settings are listed
    assert str(recipe) in msg


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("micro_batch_size=abc", "micro_batch_size"),
        ("micro_batch_size=1.5", "micro_batch_size"),
        ("epochs=true", "epochs"),
        ("max_steps=yes", "max_steps"),
        ("learning_rate=fast", "learning_rate"),
        ("train_files={a: 1}", "train_files"),
    ],
)
def test_wrong_type_is_named(recipe: Path, override: str, field: str):
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), [override])
    assert f"{field}: expected" in _errors(e)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("precision=fp8", "precision: must be fp32, bf16 or fp16"),
        ("micro_batch_size=0", "micro_batch_size: must be at least 1"),
        ("gradient_accumulation_steps=-1", "gradient_accumulation_steps: must be at least 1"),
        ("max_length=0", "max_length: must be at least 1"),
        ("min_lr_ratio=2", "min_lr_ratio: must be within [0, 1]"),
        ("min_lr_ratio=-0.1", "min_lr_ratio: must be within [0, 1]"),
        ("learning_rate=0", "learning_rate: must be positive"),
        ("warmup_steps=-5", "warmup_steps: must be 0 or more"),
        ("intended_batch=-8", "intended_batch: must be 0 or more"),
        ("epochs=0", "epochs: must be positive"),
        ("template=nope", "template: unknown chat template 'nope'"),
        ("train_files=[]", "train_files: at least one training file is required"),
        ("train_files=missing.jsonl", "train_files: no such file 'missing.jsonl'"),
        ("val_files=[gone.jsonl]", "val_files: no such file 'gone.jsonl'"),
    ],
)
def test_bad_values_are_named(recipe: Path, override: str, needle: str):
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), [override])
    assert needle in _errors(e)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learning_rate=inf", "learning_rate: must be positive and finite, got inf"),
        ("learning_rate=.inf", "learning_rate: must be positive and finite, got inf"),
        ("grad_clip=inf", "grad_clip: must be 0 or more and finite, got inf"),
        ("weight_decay=.inf", "weight_decay: must be 0 or more and finite, got inf"),
        ("epochs=inf", "epochs: must be 0 or more and finite, got inf"),
        ("epochs=-1", "epochs: must be 0 or more and finite, got -1.0"),
        ("lora_alpha=-16", "lora_alpha: must be positive and finite, got -16.0"),
        ("lora_alpha=0", "lora_alpha: must be positive and finite, got 0.0"),
        ("lora_alpha=.nan", "lora_alpha: must be positive and finite, got nan"),
        ("lora_dropout=1", "lora_dropout: must be within [0, 1), got 1.0"),
        ("lora_dropout=-0.1", "lora_dropout: must be within [0, 1), got -0.1"),
        ("lora_dropout=.nan", "lora_dropout: must be within [0, 1), got nan"),
        ("tokenize_procs=100000", "tokenize_procs: must be at most 256, got 100000"),
        ("output_dir=", "output_dir: must not be empty"),
        ("output_dir=' '", "output_dir: must not be empty"),
        ("deepspeed=zero9", "deepspeed: no preset 'zero9': give a name in dsconfig/ (pipeline, zero0, "),
        ("deepspeed=", "deepspeed: no preset ''"),
        ("deepspeed=nowhere/ds.json", "deepspeed: no preset 'nowhere/ds.json'"),
        (
            "pipeline_stages=2",  # the recipe's deepspeed is the default, zero3
            "pipeline_stages: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, and "
            "deepspeed=zero3 is stage 3; use deepspeed=pipeline",
        ),
    ],
)
def test_values_that_would_fail_after_the_launch_are_named(recipe: Path, override: str, needle: str):
    """Each used to pass validation (and --dry-run) and fail in the ranks, or train to NaN."""
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), [override])
    msg = _errors(e)
    assert needle in msg
    assert len(msg.splitlines()) == 2  # the heading, then this one problem on one line


@pytest.mark.parametrize("preset", ["zero2", "zero2_offload", "zero3_offload"])
def test_the_pipeline_engine_refuses_zero_2_and_3(recipe: Path, preset: str):
    with pytest.raises(ConfigError, match=f"deepspeed={preset} is stage [23]; use deepspeed=pipeline"):
        load_config(str(recipe), ["pipeline_stages=4", f"deepspeed={preset}"])


def test_the_pipeline_engine_takes_zero_0_and_1(recipe: Path, tmp_path: Path):
    for preset in ("pipeline", "zero0"):
        assert load_config(str(recipe), ["pipeline_stages=4", f"deepspeed={preset}"]).pipeline_stages == 4
    stage1 = tmp_path / "stage1.json"
    stage1.write_text('{"zero_optimization": {"stage": 1}}', encoding="utf-8")
    assert load_config(str(recipe), ["pipeline_stages=2", f"deepspeed={stage1}"]).deepspeed == str(stage1)


def test_a_preset_file_that_is_not_a_deepspeed_config(recipe: Path, tmp_path: Path):
    broken, listed = tmp_path / "broken.json", tmp_path / "list.json"
    broken.write_text("{not json", encoding="utf-8")
    listed.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"deepspeed: {broken} is not readable JSON"):
        load_config(str(recipe), [f"deepspeed={broken}"])
    with pytest.raises(ConfigError, match=f"deepspeed: {listed} is not a DeepSpeed config"):
        load_config(str(recipe), [f"deepspeed={listed}"])


def test_quantized_and_8bit_adam_need_their_zero_stages(recipe: Path):
    qlora = ["lora_r=8", "quantize=4bit"]
    with pytest.raises(ConfigError, match="a quantized base cannot be partitioned by ZeRO-3"):
        load_config(str(recipe), [*qlora, "deepspeed=zero3"])
    with pytest.raises(ConfigError, match="optim: adamw8bit needs ZeRO stage 0"):
        load_config(str(recipe), ["optim=adamw8bit", "deepspeed=zero2"])
    assert load_config(str(recipe), [*qlora, "optim=adamw8bit", "deepspeed=zero0"]).quantize == "4bit"


def test_edge_values_that_are_fine(recipe: Path):
    cfg = load_config(
        str(recipe),
        ["tokenize_procs=256", "lora_dropout=0", "lora_alpha=0.5", "grad_clip=0", "epochs=0", "max_steps=3"],
    )
    assert (cfg.tokenize_procs, cfg.lora_dropout, cfg.grad_clip) == (256, 0.0, 0.0)


def test_epochs_zero_is_fine_with_max_steps(recipe: Path):
    assert load_config(str(recipe), ["epochs=0", "max_steps=5"]).max_steps == 5


def test_unknown_template_lists_known_ones(recipe: Path):
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), ["template=nope"])
    assert "openchatkit" in _errors(e)


def test_several_problems_are_reported_together(recipe: Path):
    overrides = [
        "bogus=1",
        "micro_batch_size=abc",
        "epochs=true",
        "precision=fp8",
        "min_lr_ratio=2",
        "template=nope",
        "train_files=[missing.jsonl]",
        "learning_rate=inf",
        "lora_dropout=1.5",
        "output_dir=",
        "deepspeed=zero9",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe), overrides)
    msg = _errors(e)
    for needle in (
        "bogus: unknown setting",
        "micro_batch_size: expected int",
        "epochs: expected float",
        "precision: must be",
        "min_lr_ratio: must be within",
        "template: unknown chat template",
        "train_files: no such file 'missing.jsonl'",
        "learning_rate: must be positive and finite",
        "lora_dropout: must be within [0, 1)",
        "output_dir: must not be empty",
        "deepspeed: no preset 'zero9'",
    ):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"
    # One problem per line, after the heading.
    assert len(msg.splitlines()) == 1 + len(overrides)


def test_read_config_returns_every_problem_and_what_it_could_not_read(recipe: Path):
    """The launcher's entry: a config to check the launch against even when a setting is bad, and the
    settings whose value stands in for one that could not be read (load_config raises on all of it)."""
    from chatkit.config import read_config

    cfg, errors, unread = read_config(str(recipe), ["max_length=abc", "deepspeed=zero9", "seed=3"], False)
    assert [e.split(":")[0] for e in errors] == ["max_length", "deepspeed"]
    assert unread == {"max_length"} and cfg.deepspeed == "zero9" and cfg.seed == 3
    assert cfg.max_length == TrainConfig().max_length  # the default stands in


def test_override_without_equals_errors(recipe: Path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(str(recipe), ["max_steps"])


def test_recipe_that_is_not_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_check_files_false_skips_existence(recipe: Path):
    overrides = ["train_files=[nowhere/train.jsonl]", "val_files=[nowhere/val.jsonl]"]
    cfg = load_config(str(recipe), overrides, check_files=False)
    assert cfg.train_files == ["nowhere/train.jsonl"]
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(recipe), overrides, check_files=True)


def test_check_files_false_still_needs_a_train_file(recipe: Path):
    with pytest.raises(ConfigError, match="at least one training file"):
        load_config(str(recipe), ["train_files=[]"], check_files=False)


def test_save_then_load_round_trips(tmp_path: Path, recipe: Path, data_files):
    a, b = data_files
    cfg = load_config(
        str(recipe),
        [
            f"train_files=[{a},{b}]",
            f"val_files=[{b}]",
            "learning_rate=1.5e-7",
            "epochs=2.5",
            "precision=bf16",
        ],
    )
    path = tmp_path / "saved" / "train_config.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path: Path):
    cfg = load_config(str(path), check_files=False)
    assert isinstance(cfg, TrainConfig)
    assert cfg.train_files
    # Every key written in the recipe is a real setting with the value written there.
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key


def test_there_are_recipes_to_check():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "tiny.yaml"}


# --- DeepSpeed presets ----------------------------------------------------------------------------


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("preset", DS_PRESETS, ids=[p.stem for p in DS_PRESETS])
def test_resolve_ds_config_fills_every_auto(preset: Path, precision: str):
    cfg = TrainConfig(
        train_files=["x.jsonl"],
        deepspeed=preset.stem,
        precision=precision,
        micro_batch_size=3,
        gradient_accumulation_steps=5,
        learning_rate=7e-4,
        weight_decay=0.01,
        grad_clip=0.5,
    )
    ds = resolve_ds_config(cfg, hidden_size=64)
    autos = [p for p, v in _walk(ds) if v == "auto"]
    assert autos == []
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 7e-4
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    # Settings that were not "auto" are kept as written.
    raw = yaml.safe_load(preset.read_text())
    assert ds["zero_optimization"]["stage"] == raw["zero_optimization"]["stage"]
    if raw["zero_optimization"].get("reduce_bucket_size") == "auto":
        assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["optimizer"]["params"]["betas"] == raw["optimizer"]["params"]["betas"]


def test_there_are_ds_presets():
    assert {p.stem for p in DS_PRESETS} >= {"zero2", "zero3"}


def test_resolve_ds_config_zero3_bucket_sizes_follow_hidden_size():
    ds = resolve_ds_config(TrainConfig(train_files=["x"], deepspeed="zero3"), hidden_size=100)
    z = ds["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 1000
    assert z["stage3_prefetch_bucket_size"] == 9000
    assert z["reduce_bucket_size"] == 10000


def test_resolve_ds_config_accepts_a_path(tmp_path: Path):
    path = tmp_path / "mine.json"
    path.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}')
    ds = resolve_ds_config(TrainConfig(train_files=["x"], deepspeed=str(path), micro_batch_size=6), 32)
    assert ds == {"train_micro_batch_size_per_gpu": 6, "zero_optimization": {"stage": 1}}


def test_resolve_ds_config_unknown_auto_field(tmp_path: Path):
    path = tmp_path / "odd.json"
    path.write_text('{"mystery": "auto"}')
    with pytest.raises(ValueError, match="mystery"):
        resolve_ds_config(TrainConfig(train_files=["x"], deepspeed=str(path)), 32)


def test_resolve_ds_config_unknown_name_lists_known():
    with pytest.raises(FileNotFoundError) as e:
        resolve_ds_config(TrainConfig(train_files=["x"], deepspeed="zero9"), 64)
    msg = str(e.value)
    assert "zero9" in msg
    for p in DS_PRESETS:
        assert p.stem in msg


# --- learning-rate schedule -----------------------------------------------------------------------


def test_lr_warmup_is_linear_then_peaks():
    f = lr_lambda(total_steps=100, warmup=10, min_ratio=0.1)
    warm = [f(s) for s in range(10)]
    assert warm[0] == pytest.approx(0.1)
    steps = [b - a for a, b in zip(warm, warm[1:], strict=False)]
    assert all(d == pytest.approx(0.1) for d in steps)
    assert all(0 < w <= 1 for w in warm)
    assert f(10) == pytest.approx(1.0)  # peak right after warm-up


def test_lr_cosine_decays_monotonically_to_min_ratio():
    f = lr_lambda(total_steps=100, warmup=10, min_ratio=0.1)
    decay = [f(s) for s in range(10, 101)]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    assert f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(1000) == pytest.approx(0.1)  # past the end it stays at the floor


def test_lr_without_warmup_starts_at_peak():
    f = lr_lambda(total_steps=50, warmup=0, min_ratio=0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.0, abs=1e-12)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    ("setting", "value", "expect"),
    [("chunked_loss", "sometimes", "auto, always, never"), ("reasoning", "hidden", "train or context")],
)
def test_loss_and_reasoning_settings_are_validated_in_one_line(tmp_path, setting, value, expect):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    cfg = load_config(None, [f"train_files={data}"])
    assert (cfg.chunked_loss, cfg.reasoning) == ("auto", "train")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train_files={data}", f"{setting}={value}"])
    (line,) = [x for x in str(e.value).splitlines() if setting in x]
    assert expect in line and repr(value) in line


def test_reasoning_policy_reaches_the_runs_template(tmp_path):
    """`reasoning: context` keeps a qwen3 reply's reasoning in the text but out of the labels."""
    import torch

    from chatkit.conversation import Message
    from chatkit.models import train_tokenizer
    from chatkit.templates import get_template
    from chatkit.tokenization import encode_conversation
    from chatkit.train.context import make_run

    qwen3 = get_template("qwen3")
    tok = train_tokenizer(["think about the weather", "it is sunny"], 300, extra_tokens=qwen3.special_tokens)
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("")
    msgs = [Message("user", "weather?"), Message("assistant", "sunny", reasoning="think about the weather")]
    trained = {}
    for policy in ("train", "context"):
        cfg = load_config(None, [f"train_files={data}", f"model={tmp_path / 'base'}", "template=qwen3",
                                 f"reasoning={policy}"])  # fmt: skip
        run = make_run(cfg, 0, 1, torch.device("cpu"))
        enc = encode_conversation(run.tokenizer, run.template, msgs)
        trained[policy] = run.tokenizer.decode([t for t in enc.labels if t >= 0])
    assert "think about the weather" in trained["train"] and "sunny" in trained["train"]
    assert "think about the weather" not in trained["context"] and "sunny" in trained["context"]
