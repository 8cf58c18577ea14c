"""Checkpoint bookkeeping, in process: manifests, the choice of the checkpoint to resume from, the
completion of a save cut short between its renames, and the data-position guard. The same paths run
through the real launcher with real DeepSpeed checkpoints in test_training_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatkit.config import TrainConfig
from chatkit.train import checkpoint
from chatkit.train.context import RunError
from chatkit.train.manifest import check_manifest, write_manifest


def _ckpt(root: Path, tag: str, manifest: bool = True, **meta) -> Path:
    folder = root / tag
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "optim.pt").write_bytes(b"optimizer" * 50)
    (folder / "chatkit.json").write_text(json.dumps(meta))
    if manifest:
        write_manifest(folder)
    return folder


def test_manifest_accepts_the_saved_folder_and_names_each_kind_of_damage(tmp_path):
    folder = _ckpt(tmp_path, "step2")
    assert check_manifest(folder) is None
    shard = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard.write_bytes(b"weights" * 99)  # truncated
    assert "has 693 bytes, 700 when saved" in check_manifest(folder)
    shard.write_bytes(b"Weights" * 100)  # same size, other bytes
    assert "differs from what was saved" in check_manifest(folder)
    shard.unlink()
    assert check_manifest(folder).endswith("model_states.pt is missing")
    (folder / "manifest.json").write_text("{not json")
    assert "unreadable" in check_manifest(folder)
    assert check_manifest(tmp_path / "nope").endswith("does not exist")


def test_a_folder_saved_before_manifests_is_accepted_unless_empty(tmp_path):
    assert check_manifest(_ckpt(tmp_path, "step2", manifest=False)) is None
    (tmp_path / "step4").mkdir()
    assert check_manifest(tmp_path / "step4").endswith("is empty")


def test_resume_takes_latest_when_complete(tmp_path):
    _ckpt(tmp_path, "step2")
    _ckpt(tmp_path, "step4")
    (tmp_path / "latest").write_text("step4")
    assert checkpoint.newest_complete(tmp_path) == (tmp_path, "step4")


@pytest.mark.parametrize("damage", ["truncated", "missing file", "latest names no folder", "empty shard"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage, caplog_loguru):
    _ckpt(tmp_path, "step2")
    step4 = _ckpt(tmp_path, "step4")
    (tmp_path / "latest").write_text("step4")
    shard = step4 / "sub" / "optim.pt"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:10])
    elif damage == "missing file":
        shard.unlink()
    elif damage == "empty shard":
        shard.write_bytes(b"")
    else:
        (tmp_path / "latest").write_text("step6")
    assert checkpoint.newest_complete(tmp_path) == (
        tmp_path,
        "step4" if damage.startswith("latest") else "step2",
    )
    said = "\n".join(caplog_loguru)
    assert "is damaged" in said and "resuming from" in said


def test_no_complete_checkpoint_is_an_error_naming_each(tmp_path):
    step2 = _ckpt(tmp_path, "step2")
    (step2 / "sub" / "optim.pt").unlink()
    with pytest.raises(
        RunError, match=r"no complete checkpoint in .*step2 is damaged: .*optim.pt is missing"
    ):
        checkpoint.newest_complete(tmp_path)
    (tmp_path / "fresh").mkdir()
    assert checkpoint.newest_complete(tmp_path / "fresh") is None  # nothing saved yet: start fresh


def test_a_save_cut_between_its_renames_is_completed(tmp_path):
    """Killed after the old step6 was moved aside and before the new one took its name: `latest`
    names step6, which is missing; the complete temporary folder becomes step6."""
    _ckpt(tmp_path, "step4")
    _ckpt(tmp_path, ".replaced-step6")
    new = _ckpt(tmp_path, ".tmp-step6")
    (new / "chatkit.json").write_text('{"new": true}')
    write_manifest(new)
    (tmp_path / "latest").write_text("step6")
    assert checkpoint.newest_complete(tmp_path) == (tmp_path, "step6")
    assert json.loads((tmp_path / "step6" / "chatkit.json").read_text()) == {"new": True}
    assert not (tmp_path / ".replaced-step6").exists() and not (tmp_path / ".tmp-step6").exists()


def test_an_incomplete_temporary_folder_is_never_taken(tmp_path):
    _ckpt(tmp_path, "step2")
    _ckpt(tmp_path, ".tmp-step4", manifest=False)  # killed while saving: no manifest yet
    (tmp_path / "latest").write_text("step2")
    assert checkpoint.newest_complete(tmp_path) == (tmp_path, "step2")
    assert not (tmp_path / "step4").exists()


def test_publish_moves_the_old_folder_aside_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    _ckpt(tmp_path, "step6")
    _ckpt(tmp_path, ".tmp-step6")
    (tmp_path / "latest").write_text("step6")
    seen = []
    monkeypatch.setattr(
        checkpoint, "_fault", lambda point, step: seen.append(sorted(p.name for p in tmp_path.iterdir()))
    )
    checkpoint.publish(tmp_path, ".tmp-step6", "step6", 6)
    assert seen == [[".replaced-step6", ".tmp-step6", "latest"]]  # nothing deleted at the kill point
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step6"]


def test_resume_with_other_data_settings_is_refused(tmp_path):
    cfg = TrainConfig(micro_batch_size=2)
    folder = _ckpt(tmp_path, "step2", data=checkpoint.data_position(cfg, 2))
    checkpoint.check_data_position(folder, cfg, 2)  # the same: fine
    # the same global batch split otherwise (another number of ranks): the same rows, so fine
    checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=4), 1)
    checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=1, gradient_accumulation_steps=2), 2)
    with pytest.raises(
        RunError,
        match=r"global_batch 4 -> 6\) \(micro_batch_size 2 x gradient_accumulation_steps 1 x 2 .* saved; now 2 x 1 x 3\)",
    ):
        checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=2), 3)
    with pytest.raises(RunError, match=r"seed 0 -> 1"):
        checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=2, seed=1), 2)


def test_a_checkpoint_saved_before_global_batches_were_recorded_is_checked_by_its_split(tmp_path):
    old = {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 2048, "pack": True,
           "seed": 0, "train_files": [], "data_parallel": 2}  # fmt: skip
    folder = _ckpt(tmp_path, "step2", data=old)
    checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=4, max_length=2048, pack=True), 1)
    with pytest.raises(RunError, match=r"global_batch 4 -> 8"):
        checkpoint.check_data_position(folder, TrainConfig(micro_batch_size=4, max_length=2048, pack=True), 2)


def test_explicit_damaged_tag_is_an_error(tmp_path):
    step2 = _ckpt(tmp_path, "step2")
    (step2 / "sub" / "optim.pt").write_bytes(b"x")
    with pytest.raises(RunError, match="checkpoint .*step2 is damaged"):
        checkpoint.find_resume(TrainConfig(resume=str(step2)))
    with pytest.raises(RunError, match="no checkpoint at"):
        checkpoint.find_resume(TrainConfig(resume=str(tmp_path / "elsewhere")))


class _FullDiskEngine:
    """Fails inside save_checkpoint as torch does on a full disk, after writing part of its files."""

    module = None

    def zero_optimization_stage(self) -> int:
        return 3

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 basic_ios::clear: iostream error"
        )


def test_a_full_disk_during_a_save_says_so_and_leaves_nothing_behind(
    tmp_path, monkeypatch, make_wordlevel_tokenizer
):
    import shutil
    from collections import namedtuple

    import torch.distributed as dist
    from transformers import GPTNeoXConfig

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 4096, 4096))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    good = _ckpt(tmp_path / "run" / "checkpoints", "step2")
    (good.parent / "latest").write_text("step2")
    with pytest.raises(
        RunError, match=r"saving checkpoint step4 in .* failed: no space left on device \(0 MiB free\)"
    ):
        checkpoint.save(_FullDiskEngine(), cfg, make_wordlevel_tokenizer(), 4, 0, {}, GPTNeoXConfig())
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step2"]  # no half-written folder left
    assert checkpoint.newest_complete(ckpts) == (ckpts, "step2")
