"""The one training loop (chatkit.train.loop.fit), in process, over a fake engine.

The fake records what the loop asks of it, so these tests pin the loop's contract: which micro-batches
each step gets, the trained-token count it is told, when it evaluates, samples and saves, and where a
resumed run picks up. The real engines are tested against a single process in test_training_runs.py,
test_accumulation.py and test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatkit.config import TrainConfig
from chatkit.conversation import Conversation, Message, write_conversations
from chatkit.data import tokenize_file
from chatkit.templates import get_template
from chatkit.train.context import Run
from chatkit.train.data import load_data
from chatkit.train.loop import fit
from chatkit.train.loss import trained_count
from chatkit.train.method import SFT


class FakeEngine:
    """Answers like an engine on one rank: the loss of a step is a function of its batches."""

    def __init__(self, saved_at: Path):
        self.dp_rank, self.dp_world = 0, 1
        self.steps: list[tuple[list[torch.Tensor], float]] = []
        self.calls: list[tuple] = []
        self.saved_at = saved_at
        self.resumed: tuple | None = None

    def setup(self, total_steps: int) -> None:
        self.calls.append(("setup", total_steps))

    def describe(self) -> tuple[str, int]:
        return "1 rank(s)", 1234

    def dp_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def train_step(self, micro, count: float) -> dict[str, float]:
        self.steps.append(([b["input_ids"] for b in micro], count))
        return {"loss": float(sum(int(b["input_ids"].sum()) for b in micro)) / max(count, 1)}

    def evaluate(self, val_sets) -> dict[str, float]:
        self.calls.append(("evaluate", len(self.steps)))
        return {"loss": 0.5}

    def sample(self, prompts: list[str]) -> list[str]:
        self.calls.append(("sample", len(self.steps)))
        return [p.upper() for p in prompts]

    def save(self, step: int, epoch: int) -> Path:
        self.calls.append(("save", step, epoch))
        return self.saved_at / f"step{step}"

    def resume(self, root: Path, tag: str) -> int:
        self.resumed = (root, tag)
        return int(tag.removeprefix("step"))

    def lr(self) -> float:
        return 1e-3


def _data(tmp_path: Path) -> str:
    convs = [
        Conversation([Message("user", "hi there"), Message("assistant", " ".join(["fine"] * (1 + i % 5)))])
        for i in range(24)
    ]
    path = tmp_path / "train.jsonl"
    write_conversations(path, convs)
    return str(path)


def _run(tmp_path: Path, tokenizer, **overrides) -> Run:
    cfg = TrainConfig(
        train_files=[_data(tmp_path)], val_files=[_data(tmp_path)], output_dir=str(tmp_path / "out"),
        max_length=32, micro_batch_size=2, gradient_accumulation_steps=3, max_steps=4, pack=True,
        cache_dir=str(tmp_path / "cache"), log_every=1, train_log_backend=["loguru"], **overrides,
    )  # fmt: skip
    template = get_template("openchatkit", tokenizer)
    return Run(cfg, 0, 1, torch.device("cpu"), tokenizer, template, 0, SFT)


@pytest.fixture
def one_rank(monkeypatch):
    """Collectives of one rank: load_sets' barrier and choose_resume's broadcast have no one to wait for."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: None)


def _fit(run: Run, engine: FakeEngine):
    batches, val_sets = load_data(run, engine.dp_rank, engine.dp_world)
    return fit(run, engine, batches, val_sets), batches


def test_fit_steps_counts_and_logs(tmp_path, make_wordlevel_tokenizer, one_rank):
    run = _run(tmp_path, make_wordlevel_tokenizer(), eval_every=2, save_every=3, eval_prompts=["hi"])
    engine = FakeEngine(tmp_path)
    last, batches = _fit(run, engine)
    # 4 steps of 3 micro-batches each, in the stream's order (an epoch ends after its last whole
    # step), each told the step's trained tokens
    stream = batches.stream(accumulation=3)
    assert len(engine.steps) == 4
    for inputs, count in engine.steps:
        expected = [next(stream)[1] for _ in range(3)]
        assert all(torch.equal(a, b["input_ids"]) for a, b in zip(inputs, expected, strict=True))
        assert count == sum(trained_count(b) for b in expected) > 0
    # evaluation (val loss + samples) at step 2 and at the end; saves at step 3 and at the end
    assert [c for c in engine.calls if c[0] == "evaluate"] == [("evaluate", 2), ("evaluate", 4)]
    assert [c for c in engine.calls if c[0] == "sample"] == [("sample", 2), ("sample", 4)]
    assert [c[:2] for c in engine.calls if c[0] == "save"] == [("save", 3), ("save", 4)]
    out = Path(run.cfg.output_dir)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert {"step": 2, "samples": {"hi": "HI"}} in rows
    assert json.loads((out / "final_metrics.json").read_text()) == last
    assert last["val_loss"] == 0.5 and last["step"] == 4
    assert (out / "train_config.yaml").is_file()


def test_resumed_fit_continues_the_uninterrupted_stream(tmp_path, make_wordlevel_tokenizer, one_rank):
    tok = make_wordlevel_tokenizer()
    for d in ("a", "b/out/checkpoints/step2"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "b/out/checkpoints/step2/mp_rank_00_model_states.pt").write_bytes(b"saved")
    full = FakeEngine(tmp_path)
    _fit(_run(tmp_path / "a", tok), full)
    ckpt = tmp_path / "b" / "out" / "checkpoints"
    (ckpt / "latest").write_text("step2")
    resumed = FakeEngine(tmp_path)
    _fit(_run(tmp_path / "b", tok, resume="auto"), resumed)
    assert resumed.resumed == (ckpt, "step2")
    assert len(resumed.steps) == 2  # steps 3 and 4 only
    for (a, ca), (b, cb) in zip(full.steps[2:], resumed.steps, strict=True):
        assert ca == cb and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_tokenized_cache_is_shared_by_both_fits(tmp_path, make_wordlevel_tokenizer):
    """Sanity for the fixture data: every conversation fits 32 tokens and trains something."""
    tok = make_wordlevel_tokenizer()
    ts = tokenize_file(_data(tmp_path), tok, get_template("openchatkit", tok), 32, cache_dir=tmp_path)
    assert len(ts) == 24 and ts.stats.get("too_long", 0) == 0


def test_a_finished_run_relaunched_trains_and_saves_nothing(tmp_path, make_wordlevel_tokenizer, one_rank):
    run = _run(tmp_path, make_wordlevel_tokenizer(), resume="auto")
    ckpt = run.out / "checkpoints" / "step4"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"saved")
    (ckpt.parent / "latest").write_text("step4")
    (run.out / "final_metrics.json").write_text('{"loss": 1.5}')
    engine = FakeEngine(tmp_path)
    last, _ = _fit(run, engine)
    assert last == {"loss": 1.5} and engine.steps == [] and not [c for c in engine.calls if c[0] == "save"]


def test_a_non_finite_loss_stops_the_run_before_any_save(tmp_path, make_wordlevel_tokenizer, one_rank):
    from chatkit.train.context import RunError

    class Diverging(FakeEngine):
        def train_step(self, micro, count):
            super().train_step(micro, count)
            return {"loss": float("nan") if len(self.steps) == 2 else 1.0}

    run = _run(tmp_path, make_wordlevel_tokenizer(), save_every=1)
    engine = Diverging(tmp_path)
    with pytest.raises(RunError, match="the loss is nan at step 2") as e:
        _fit(run, engine)
    assert e.value.all_ranks
    assert [c[:2] for c in engine.calls if c[0] == "save"] == [("save", 1)]  # step 2 never saved
    assert not (run.out / "final_metrics.json").exists()


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(
    tmp_path, make_wordlevel_tokenizer, one_rank
):
    run = _run(tmp_path, make_wordlevel_tokenizer(), resume="auto")
    ckpt = run.out / "checkpoints" / "step2"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"saved")
    (ckpt.parent / "latest").write_text("step2")
    # the interrupted run had logged steps 1-3 (killed after step 3, last checkpoint at 2)
    rows = [{"step": s, "loss": 9.0, "lr": 1e-3} for s in (1, 2, 3)] + [{"step": 3, "val_loss": 9.0}]
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fit(run, FakeEngine(tmp_path))
    steps = [json.loads(x)["step"] for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and steps.count(3) == 1 and steps[-1] == 4
