"""Runs that must agree or survive, through the real deepspeed launcher on CPU ranks (gloo):

- ZeRO-3 on 2 ranks takes the same steps as a single process (loss to 1e-4, weights to 1e-4);
- a run killed with SIGKILL (mid-training, or while saving) and resumed with resume=auto ends with
  the weights of the uninterrupted run; resuming runs no code from a tampered checkpoint;
- LoRA leaves the base weights untouched; QLoRA (4-bit NF4 base, 8-bit AdamW) trains on CPU and
  resumes exactly;
- two launcher invocations as two nodes on loopback form one run;
- evaluation logs validation loss and sample replies; wandb works offline; the curves PNG is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatkit.conversation import write_conversations
from chatkit.convert.deepspeed import load_deepspeed_weights
from chatkit.datasets.synthetic import make_splits
from chatkit.launch import free_port
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    train, val = make_splits(160, 8, seed=2)
    write_conversations(root / "train.jsonl", train)
    write_conversations(root / "val.jsonl", val)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root


def launch(root: Path, name: str, *args: str, ranks: int = 2, env: dict | None = None, ok: bool = True):
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / name}", f"cache_dir={root / 'cache'}",
        f"max_steps={STEPS}", "log_every=1", "warmup_steps=0", "learning_rate=2e-3", "max_length=128",
        "--cpu-ranks", str(ranks), "--master-port", "0", *args,
    ]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    if ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    else:
        assert r.returncode != 0
    return r


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}


EVAL = ["eval_every=3", 'eval_prompts=["What is 2 + 2?"]']


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """2 ranks, ZeRO-3, checkpoints every 2 steps, validation, samples, wandb offline."""
    launch(
        root, "ref", "micro_batch_size=2", "save_every=2", f"val_files=[{root / 'val.jsonl'}]", *EVAL,
        "train_log_backend=[loguru,wandb]", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    return root / "ref"


def test_zero3_on_two_ranks_matches_one_process(root, reference):
    single = root / "single"
    launch(
        root,
        "single",
        "micro_batch_size=4",
        "save_every=2",
        f"val_files=[{root / 'val.jsonl'}]",
        *EVAL,
        ranks=1,
    )
    ref, one = losses(reference), losses(single)
    assert sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - one[step]) < 1e-4, step
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(single / "checkpoints")
    assert max(float((wa[k] - wb[k]).abs().max().detach()) for k in wa) < 1e-4


def test_chunked_loss_under_zero3_takes_the_steps_of_the_full_logits_loss(root, reference):
    """chunked_loss=always (the loss from hidden states, chunk by chunk, inside the engine's forward
    where ZeRO-3 gathers the head) trains as the logits path does: losses, validation and weights."""
    launch(
        root, "chunked", "micro_batch_size=2", "save_every=2", f"val_files=[{root / 'val.jsonl'}]", *EVAL,
        "chunked_loss=always",
    )  # fmt: skip
    ref, chunked = losses(reference), losses(root / "chunked")
    assert sorted(chunked) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - chunked[step]) < 1e-4, step
    val = [m["val_loss"] for m in metrics(reference) if "val_loss" in m]
    assert val and val == pytest.approx(
        [m["val_loss"] for m in metrics(root / "chunked") if "val_loss" in m], abs=1e-4
    )
    wa = load_deepspeed_weights(reference / "checkpoints")
    wb = load_deepspeed_weights(root / "chunked" / "checkpoints")
    assert max(float((wa[k] - wb[k]).abs().max().detach()) for k in wa) < 1e-4


def test_evaluation_monitoring_and_retention(reference):
    rows = metrics(reference)
    val = [m for m in rows if "val_loss" in m]
    assert [m["step"] for m in val] == [3, 6] and all(m["val_ppl"] > 1 for m in val)
    samples = [m for m in rows if "samples" in m]
    assert [m["step"] for m in samples] == [3, 6] and "What is 2 + 2?" in samples[0]["samples"]
    assert (reference / "curves.png").stat().st_size > 1000
    assert "step 6/6 | loss" in (reference / "train.log").read_text()
    assert list((reference / "wandb").glob("offline-run-*"))
    ckpts = reference / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step2", "step4", "step6"]
    assert not list(ckpts.glob(".tmp-*")) and (ckpts / "latest").read_text() == "step6"


def test_sigkill_then_resume_matches_uninterrupted(root, reference):
    run = root / "killed"
    launch(root, "killed", "micro_batch_size=2", "save_every=2", f"val_files=[{root / 'val.jsonl'}]", *EVAL,
           env={"CHATKIT_FAULT": "step:5"}, ok=False)  # fmt: skip
    assert (run / "checkpoints" / "latest").read_text() == "step4"
    r = launch(root, "killed", "micro_batch_size=2", "save_every=2", f"val_files=[{root / 'val.jsonl'}]", *EVAL,
               "resume=auto")  # fmt: skip
    assert "at step 4" in r.stdout + r.stderr
    assert losses(run)[6] == pytest.approx(losses(reference)[6], abs=1e-6)
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(run / "checkpoints")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigkill_while_saving_keeps_last_good_checkpoint(root, reference):
    run = root / "crash_in_save"
    args = (
        "micro_batch_size=2",
        "save_every=2",
        "keep_checkpoints=2",
        f"val_files=[{root / 'val.jsonl'}]",
        *EVAL,
    )
    launch(root, "crash_in_save", *args, env={"CHATKIT_FAULT": "save:4"}, ok=False)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step2"  # the half-saved step 4 never became current
    assert (ckpts / ".tmp-step4").is_dir() and not (ckpts / "step4").exists()
    r = launch(root, "crash_in_save", *args, "resume=auto")
    assert "at step 2" in r.stdout + r.stderr
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step4", "step6"]  # keep_checkpoints=2
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(ckpts)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


SAME_AS_REFERENCE = ("micro_batch_size=2", "save_every=2", *EVAL)


@pytest.fixture(scope="module")
def interrupted(root) -> Path:
    """A run killed at step 5: complete checkpoints step2 and step4, `latest` naming step4."""
    launch(root, "interrupted", *SAME_AS_REFERENCE, f"val_files=[{root / 'val.jsonl'}]",
           env={"CHATKIT_FAULT": "step:5"}, ok=False)  # fmt: skip
    assert (root / "interrupted" / "checkpoints" / "latest").read_text() == "step4"
    return root / "interrupted"


@pytest.mark.parametrize("damage", ["truncated shard", "latest names no folder"])
def test_a_damaged_latest_checkpoint_is_bypassed_and_named(root, reference, interrupted, damage):
    import shutil

    name = "damaged-" + damage.replace(" ", "-")
    run = root / name
    shutil.copytree(interrupted, run)
    ckpts = run / "checkpoints"
    if damage == "truncated shard":
        shard = ckpts / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        expected = ("step4 is damaged", "optim_states.pt has", "resuming from step2 instead", "at step 2")
    else:
        (ckpts / "latest").write_text("step8")
        expected = ("step8 is damaged", "does not exist", "resuming from step4 instead", "at step 4")
    r = launch(root, name, *SAME_AS_REFERENCE, f"val_files=[{root / 'val.jsonl'}]", "resume=auto")
    out = r.stdout + r.stderr
    assert all(e in out for e in expected), out[-3000:]
    assert losses(run)[6] == pytest.approx(losses(reference)[6], abs=1e-6)  # the resume was exact
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(ckpts)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_kill_while_a_step_is_saved_again_loses_nothing(root, reference):
    """A run resumed from step4 of a finished run saves step6 again. Killed after the old step6 was
    moved aside and before the new one took its place, `latest` names a folder that is not there:
    the next launch completes the save, sees the run has ended, trains nothing and rewrites nothing."""
    import shutil

    run = root / "resaved"
    shutil.copytree(reference, run)
    ckpts = run / "checkpoints"
    args = (*SAME_AS_REFERENCE, f"val_files=[{root / 'val.jsonl'}]")
    launch(root, "resaved", *args, f"resume={ckpts / 'step4'}", env={"CHATKIT_FAULT": "replace:6"}, ok=False)
    assert (ckpts / "latest").read_text() == "step6" and not (ckpts / "step6").exists()
    assert (ckpts / ".replaced-step6").is_dir() and (ckpts / ".tmp-step6" / "manifest.json").is_file()
    r = launch(root, "resaved", *args, "resume=auto")
    out = r.stdout + r.stderr
    assert "completed the interrupted save of step6" in out and "already ended at step 6" in out
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step2", "step4", "step6"]
    files = {p: p.stat().st_mtime_ns for p in (ckpts / "step6").iterdir()}
    launch(root, "resaved", *args, "resume=auto")  # once more: the final checkpoint is left alone
    assert files == {p: p.stat().st_mtime_ns for p in (ckpts / "step6").iterdir()}
    wa, wb = load_deepspeed_weights(reference / "checkpoints"), load_deepspeed_weights(ckpts)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not (ckpts / "zero_to_fp32.py").exists()  # DeepSpeed's unsafe converter is not left beside them


def _processes_of(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (a run's unique output folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_two_runs_in_one_output_dir_the_second_is_refused(root):
    """The second run stops before writing anything; the first goes on; once the first is dead (its
    lock dies with it, no file to delete by hand) a new run takes the folder over."""
    import signal
    import time

    out = root / "shared-dir"
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={out}", f"cache_dir={root / 'cache'}",
        "max_steps=100000", "log_every=1", "max_length=128", "--cpu-ranks", "1", "--master-port", "0",
    ]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first run did not start training"
            )
            time.sleep(0.5)
        rows = len((out / "metrics.jsonl").read_text().splitlines())
        second = launch(root, "shared-dir", ok=False)
        out_text = second.stdout + second.stderr
        assert "error: output_dir" in out_text and "is in use by another run (pid" in out_text, out_text[
            -2000:
        ]
        assert "Traceback" not in out_text
        assert first.poll() is None  # the first run goes on, its files untouched by the second
        assert len((out / "metrics.jsonl").read_text().splitlines()) >= rows
    finally:
        for pid in _processes_of(str(out)):
            os.kill(pid, signal.SIGKILL)
        first.wait(timeout=60)
    launch(root, "shared-dir", "max_steps=1")  # the dead run's lock is gone with it


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(root, tmp_path):
    """Found when the run starts, not at its first checkpoint after hours of work. (A chmod-ed folder
    would not do: tests run as root here; a path through a file fails the same way for everyone.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = subprocess.run(
        [sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
         f"train_files=[{root / 'train.jsonl'}]", f"output_dir={blocker / 'run'}", f"cache_dir={root / 'cache'}",
         "--cpu-ranks", "1", "--master-port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0 and f"output_dir {blocker / 'run'} is not writable" in out, out[-2000:]
    assert "Traceback" not in out


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint could do to a resuming run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_runs_no_code_from_a_tampered_checkpoint(root, reference, tmp_path):
    import shutil

    run = root / "tampered"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    optim = run / "checkpoints" / "step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    state["extra"] = _RunsCode(tmp_path / "by-resume")
    torch.save(state, optim)
    torch.load(optim, weights_only=False)  # the file is armed: a plain load runs its command
    assert (tmp_path / "by-resume").exists()
    (tmp_path / "by-resume").unlink()
    # as saved, the file no longer matches step6's manifest: resume would fall back to step4 without
    # reading it; an attacker who also rewrites the manifest gets the file read, and refused
    from chatkit.train.manifest import write_manifest

    write_manifest(run / "checkpoints" / "step6")

    r = launch(root, "tampered", "micro_batch_size=2", "resume=auto", ok=False)
    assert not (tmp_path / "by-resume").exists()
    out = r.stdout + r.stderr
    assert (
        "error: resume: " in out
        and "refused" in out
        and "posix.system" in out
        and "nothing from it was run" in out
    ), out[-3000:]
    assert "weights_only=False" not in out  # torch's advice to load it unsafely is not passed on
    assert "Traceback" not in out and "another rank stopped" in out


def test_lora_leaves_base_weights_untouched(root):
    run = root / "lora"
    launch(
        root,
        "lora",
        "micro_batch_size=2",
        "lora_r=4",
        "lora_alpha=8",
        "deepspeed=zero2",
        "learning_rate=1e-2",
    )
    from transformers import AutoModelForCausalLM

    # module names (transformers maps GPT-NeoX's on-disk embed_out to lm_head)
    base = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    weights = load_deepspeed_weights(run / "checkpoints")
    checked = 0
    for name, w in weights.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if "lora_" not in name:
            assert torch.equal(w, base[plain]), name
            checked += 1
    assert checked == len(base)
    adapter = load_file(str(run / "checkpoints" / "step6" / "adapter_model.safetensors"))
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert losses(run)[STEPS] < losses(run)[1]

    # the checkpoint converts to one plain model: the adapters merged, the adapter model's logits
    from peft import PeftModel

    out = root / "lora-hf"
    r = subprocess.run(
        [sys.executable, "tools/convert_to_hf_gptneox.py", "--checkpoint", str(run / "checkpoints"),
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "base"), run / "checkpoints" / "step6"
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 7]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, peft.eval()(ids).logits, atol=1e-5)


QLORA = ("micro_batch_size=2", "quantize=4bit", "lora_r=8", "lora_alpha=16", "optim=adamw8bit", "deepspeed=zero0",
         "learning_rate=2e-2", "max_steps=12")  # fmt: skip


@pytest.fixture(scope="module")
def qlora(root) -> Path:
    launch(root, "qlora", *QLORA)
    return root / "qlora"


def test_qlora_4bit_with_8bit_adamw_trains_on_cpu(qlora):
    run = qlora
    loss = losses(run)
    first, second = [sum(loss[s] for s in r) / 6 for r in (range(1, 7), range(7, 13))]
    assert second < first - 0.05, loss  # adapters on a frozen random 4-bit base: a slow but real fall
    adapter = load_file(str(run / "checkpoints" / "step12" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_qlora_killed_then_resumed_matches_uninterrupted(root, qlora):
    run = root / "qlora-killed"
    launch(root, "qlora-killed", *QLORA, "save_every=6", env={"CHATKIT_FAULT": "step:9"}, ok=False)
    assert (run / "checkpoints" / "latest").read_text() == "step6"
    r = launch(root, "qlora-killed", *QLORA, "save_every=6", "resume=auto")
    assert "at step 6" in r.stdout + r.stderr
    assert losses(run)[12] == pytest.approx(losses(qlora)[12], abs=1e-6)
    a, b = (load_file(str(p / "checkpoints" / "step12" / "adapter_model.safetensors")) for p in (qlora, run))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_nodes_on_loopback(root, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
            f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / 'nodes'}", f"cache_dir={root / 'cache'}",
            "max_steps=2", "micro_batch_size=2", "max_length=128", "log_every=1", "--hostfile", str(hostfile),
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 rank(s)" in outs[0]
    assert [m["step"] for m in metrics(root / "nodes")] == [1, 2]
