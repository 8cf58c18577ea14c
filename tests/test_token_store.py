"""Data that outgrows RAM: the memory-mapped token store, the row plan in numpy, and tokenization
before the ranks start (chatkit.token_store, chatkit.packing, chatkit.train.data, chatkit.launch).

- A store round-trips, is whole or absent, and loading one reads none of its data (a subprocess maps
  a ~200 MB store and grows by a few MB).
- pack_rows places every item where the one-at-a-time best fit would; an epoch's plan is kept.
- The launcher (and tools/tokenize_data.py) fill the cache under the very keys the ranks look up;
  --dry-run tokenizes nothing. Ranks that find the cache empty wait for one rank's tokenization
  without any collective, and learn of its failure.
- Slow: a real launch tokenizes before the ranks, which only map the cache; a run whose rank 0
  tokenizes for longer than the process group's timeout still trains.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatkit import launch
from chatkit.config import TrainConfig
from chatkit.conversation import Conversation, Message, write_conversations
from chatkit.data import Batches, CacheEntry, TokenizedSet, pack_rows, tokenize_file
from chatkit.templates import get_template
from chatkit.token_store import StoreWriter, open_store
from chatkit.tokenization import IGNORE_INDEX, Encoded
from chatkit.train.context import Run, RunError, make_run
from chatkit.train.data import load_sets
from chatkit.train.method import SFT

REPO = Path(__file__).resolve().parents[1]


def _sequences(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 40))
        out.append((rng.integers(0, 50_000, k).astype(np.int32), rng.random(k) < 0.5))
    return out


def _write_store(entry: Path, seqs, pairs: bool = False, chunk: int = 7) -> None:
    with StoreWriter(entry, pairs) as w:
        for i in range(0, len(seqs), chunk):
            part = seqs[i : i + chunk]
            w.add(
                np.concatenate([s[0] for s in part]),
                np.concatenate([s[1] for s in part]),
                np.array([len(s[0]) for s in part]),
            )
        w.finish({"ok": len(seqs)})


@pytest.mark.parametrize("pairs", [False, True])
def test_a_store_round_trips_memory_mapped(tmp_path, pairs):
    seqs = _sequences(40)
    _write_store(tmp_path / "d-key", seqs, pairs, chunk=4)
    store = open_store(tmp_path / "d-key")
    assert store is not None and store.pairs == pairs and store.stats == {"ok": 40}
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in store[:4])
    ts = TokenizedSet(
        store.tokens, store.trained, store.offsets, store.stats, pairs, example_lengths=store.lengths
    )
    for i, (ids, trained) in enumerate(seqs):
        want = Encoded(
            ids.tolist(), [t if m else IGNORE_INDEX for t, m in zip(ids.tolist(), trained, strict=True)]
        )
        assert ts.sequence(i) == want
    lengths = [len(s[0]) for s in seqs]
    assert ts.lengths.tolist() == (
        [a + b for a, b in zip(lengths[::2], lengths[1::2], strict=True)] if pairs else lengths
    )
    assert len(ts) == (20 if pairs else 40)
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_empty_store_round_trips(tmp_path):
    with StoreWriter(tmp_path / "e") as w:
        w.finish({"ok": 0})
    store = open_store(tmp_path / "e")
    assert store is not None and len(store.tokens) == 0 and store.offsets.tolist() == [0]


def test_a_store_is_whole_or_absent(tmp_path):
    with pytest.raises(RuntimeError, match="bad line"), StoreWriter(tmp_path / "d") as w:
        w.add(np.arange(5), np.ones(5, bool), np.array([5]))
        raise RuntimeError("bad line")
    assert list(tmp_path.iterdir()) == [] and open_store(tmp_path / "d") is None


def test_two_writers_of_one_key_both_finish(tmp_path):
    """Two nodes over one shared cache: the second rename finds the first's store and drops its own."""
    seqs = _sequences(10)
    first, second = StoreWriter(tmp_path / "d"), StoreWriter(tmp_path / "d")
    for w in (first, second):
        w.add(
            np.concatenate([s[0] for s in seqs]),
            np.concatenate([s[1] for s in seqs]),
            [len(s[0]) for s in seqs],
        )
    first.finish({"ok": 10})
    second.finish({"ok": 10})
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and open_store(tmp_path / "d").stats == {"ok": 10}


def test_columns_that_disagree_are_a_damaged_entry(tmp_path, caplog_loguru):
    _write_store(tmp_path / "d", _sequences(10))
    np.save(tmp_path / "d" / "lengths.npy", np.zeros(3, np.int32))
    assert open_store(tmp_path / "d") is None and not (tmp_path / "d").exists()
    assert any("damaged tokenization cache entry" in m for m in caplog_loguru)


def test_an_old_npz_cache_entry_is_ignored(bpe_tokenizer, tmp_path):
    convs = [Conversation([Message("user", "hi"), Message("assistant", f"yes {i}")]) for i in range(5)]
    write_conversations(tmp_path / "d.jsonl", convs)
    tpl = get_template("openchatkit")
    entry = CacheEntry.of(str(tmp_path / "d.jsonl"), bpe_tokenizer, tpl, 64, cache_dir=tmp_path / "c")
    (tmp_path / "c").mkdir(exist_ok=True)
    entry.path.with_suffix(".npz").write_bytes(b"PK an old-format entry")
    ts = tokenize_file(str(tmp_path / "d.jsonl"), bpe_tokenizer, tpl, 64, cache_dir=tmp_path / "c")
    assert len(ts) == 5 and entry.path.is_dir() and isinstance(ts.tokens, np.memmap)


STORE_MB = 200
RSS_PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from chatkit.data import TokenizedSet
    from chatkit.token_store import open_store

    def memory_mb():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon")}

    before = memory_mb()
    s = open_store(sys.argv[1])
    ts = TokenizedSet(s.tokens, s.trained, s.offsets, s.stats, example_lengths=s.lengths)
    n = len(ts), int(ts.lengths.sum())
    loaded = memory_mb()
    rng = np.random.default_rng(0)
    tokens = sum(len(ts.sequence(int(i)).input_ids) for i in rng.integers(0, len(ts), 200))
    read = memory_mb()
    print(loaded["VmRSS"] - before["VmRSS"], read["RssAnon"] - before["RssAnon"], tokens)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_loading_a_store_does_not_read_it(tmp_path):
    """A rank that maps a ~200 MB store grows by almost nothing, and by little private memory once it
    has read 200 sequences (the .npz cache this replaced was read whole into every rank). The pages it
    reads count in its RSS as mapped file pages (whole large folios, up to 2 MB, on ext4): the page
    cache's, shared by every rank of a node and dropped under memory pressure; RssAnon leaves them out."""
    entry = tmp_path / "big"
    per_chunk, seq = 4_000_000, 1000  # tokens per chunk, tokens per sequence
    chunks = STORE_MB * 1_000_000 // 5 // per_chunk  # 5 bytes a token: int32 id and bool target
    with StoreWriter(entry) as w:
        for c in range(chunks):
            ids = (np.arange(per_chunk, dtype=np.int64) + c * per_chunk) % 50_000
            w.add(ids, ids % 3 == 0, np.full(per_chunk // seq, seq))
        w.finish({"ok": chunks * per_chunk // seq})
    size_mb = sum(f.stat().st_size for f in entry.iterdir()) / 1e6
    assert size_mb > 0.95 * STORE_MB
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(entry)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    loaded, private, tokens = (float(x) for x in probe.stdout.split())
    assert tokens == 200 * seq
    assert loaded < 10, f"mapping a {size_mb:.0f} MB store grew the process by {loaded:.1f} MB"
    assert private < 10, f"reading 200 sequences of a {size_mb:.0f} MB store took {private:.1f} MB"


# --- the row plan -------------------------------------------------------------------------------


def _best_fit_one_by_one(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit decreasing, item by item: the open row with the least room that fits, the one that
    last received an item among equals (the segment-tree loop pack_rows replaced)."""
    rows: list[list[int]] = []
    room: list[int] = []
    last: list[int] = []
    for t, i in enumerate(sorted(range(len(lengths)), key=lambda k: -lengths[k])):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], -last[r]))
        else:
            rows.append([])
            room.append(capacity)
            last.append(-1)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
        last[r] = t
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_pack_rows_places_items_as_best_fit_one_by_one(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([1, 3, 10, 17, 64]))
    lengths = rng.integers(1, int(rng.integers(1, capacity + 1)) + 1, int(rng.integers(0, 200))).tolist()
    items, starts = pack_rows(lengths, capacity)
    rows = [items[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert rows == _best_fit_one_by_one(lengths, capacity)


def test_pack_rows_refuses_what_cannot_be_packed():
    with pytest.raises(ValueError, match="example 1 has 11 tokens, more than the row capacity 10"):
        pack_rows([3, 11], 10)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        pack_rows([0, 3], 10)


def _synthetic_set(n: int, seed: int = 0) -> TokenizedSet:
    lengths = np.random.default_rng(seed).integers(1, 100, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSet(np.zeros(int(offsets[-1]), np.int32), np.ones(int(offsets[-1]), bool), offsets)


def test_an_epochs_plan_is_kept_and_covers_every_example_once():
    sets = [_synthetic_set(500, 1), _synthetic_set(300, 2)]
    b = Batches(sets, None, 4, 128, True, 0, 2, seed=3, pad_id=0)
    plan = b.rows(0)
    assert b.rows(0) is plan and b.steps_per_epoch(1) == len(plan) // 8 and b.rows(0) is plan
    drawn = sorted((f, j) for row in plan for f, j in row)
    assert drawn == [(0, j) for j in range(500)] + [(1, j) for j in range(300)]
    assert all(sum(int(sets[f].lengths[j]) for f, j in row) <= 128 for row in plan)
    other = b.rows(1)
    assert b.rows(0) is not plan and [b.rows(0)[k] for k in range(5)] == [plan[k] for k in range(5)]
    assert [other[k] for k in range(5)] != [plan[k] for k in range(5)]
    assert plan[-1] == plan[len(plan) - 1] and plan[:2] == [plan[0], plan[1]]


def test_a_weighted_unpacked_plan_has_one_example_a_row():
    sets = [_synthetic_set(10), _synthetic_set(40)]
    plan = Batches(sets, [1.0, 1.0], 2, 128, False, 0, 1, seed=0, pad_id=0).rows(0)
    assert len(plan) == 50 and all(len(row) == 1 for row in plan)
    assert sum(f == 0 for row in plan for f, _ in row) == 25  # a file of 10 drawn 25 times: its weight


# --- tokenization before the ranks, and ranks that wait without a collective --------------------


def _conversations(path: Path, n: int, bad_line: int | None = None) -> str:
    convs = [
        Conversation([Message("user", "hi there"), Message("assistant", "fine " * (1 + i % 5))])
        for i in range(n)
    ]
    write_conversations(path, convs)
    if bad_line is not None:
        lines = path.read_text().splitlines()
        lines[bad_line - 1] = '{"messages": [{"role": "robot", "content": "x"}]}'
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(tmp_path: Path, model: Path, train: str, **overrides) -> TrainConfig:
    return TrainConfig(
        model=str(model), train_files=[train], output_dir=str(tmp_path / "out"), max_length=64,
        cache_dir=str(tmp_path / "cache"), tokenize_procs=1, **overrides,
    )  # fmt: skip


def test_the_launcher_tokenizes_under_the_keys_the_ranks_look_up(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    train = _conversations(tmp_path / "train.jsonl", 30)
    val = _conversations(tmp_path / "val.jsonl", 6)
    started: list = []
    monkeypatch.setattr(launch, "run_group", lambda cmd, env, grace=None: started.append(cmd) or 0)
    monkeypatch.setattr(launch, "prebuild_cpu_adam", lambda cfg, gpu: None)
    monkeypatch.chdir(REPO)
    argv = [
        "config/tiny.yaml", f"model={tiny_model_dir}", f"train_files=[{train}]", f"val_files=[{val}]",
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "max_length=64", "--cpu-ranks", "2",
    ]  # fmt: skip
    launch.main([*argv, "--dry-run"])
    assert not (tmp_path / "cache").exists()  # a dry run tokenizes nothing
    with pytest.raises(SystemExit) as done:
        launch.main(argv)
    assert done.value.code == 0 and len(started) == 1
    err = capsys.readouterr().err
    assert err.count("tokenized in") == 2 and "30 conversations kept" in err
    # The ranks compute the same keys and find both sets: tokenizing again would fail here.
    monkeypatch.setattr("chatkit.train.data.write_entry", lambda *a, **k: pytest.fail("tokenized again"))
    cfg = _cfg(tmp_path, tiny_model_dir, train, val_files=[val])
    for rank in (0, 1):
        run = make_run(cfg, rank, 2, torch.device("cpu"))
        sets = load_sets([train, val], run)
        assert [len(s) for s in sets] == [30, 6] and isinstance(sets[0].tokens, np.memmap)
    with pytest.raises(SystemExit) as done:  # a second launch finds everything cached
        launch.main(argv)
    assert done.value.code == 0 and "tokenized in" not in capsys.readouterr().err


def test_a_bad_line_stops_the_launch_before_anything_starts(tmp_path, tiny_model_dir, monkeypatch, capsys):
    bad = _conversations(tmp_path / "bad.jsonl", 10, bad_line=4)
    monkeypatch.setattr(launch, "run_group", lambda cmd, env, grace=None: pytest.fail("started"))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        launch.main(
            ["config/tiny.yaml", f"model={tiny_model_dir}", f"train_files=[{bad}]", f"output_dir={tmp_path / 'o'}",
             f"cache_dir={tmp_path / 'cache'}", "max_length=64", "--cpu-ranks", "1"]
        )  # fmt: skip
    assert done.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:4: messages[0].role: must be one of ")
    assert errors[0].endswith("got 'robot'")
    assert not list((tmp_path / "cache").glob("bad-*"))


def test_the_tokenize_tool_fills_the_cache(tmp_path, tiny_model_dir, monkeypatch, capsys):
    train = _conversations(tmp_path / "train.jsonl", 12)
    args = [
        f"model={tiny_model_dir}",
        f"train_files=[{train}]",
        f"cache_dir={tmp_path / 'cache'}",
        "max_length=64",
    ]
    monkeypatch.setattr(sys, "argv", ["tools/tokenize_data.py", str(REPO / "config/tiny.yaml"), *args])
    runpy.run_path(str(REPO / "tools/tokenize_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "12 conversations kept" in out and "1 file(s) tokenized, 0 already in the cache" in out
    assert len(list((tmp_path / "cache").glob("train-*"))) == 1


class _NoCollectives:
    """torch.distributed's collectives, made to fail the test when called."""

    NAMES = ("barrier", "all_gather_object", "broadcast_object_list", "all_reduce", "broadcast")

    def __init__(self, monkeypatch):
        import torch.distributed as dist

        for name in self.NAMES:
            monkeypatch.setattr(dist, name, self._called(name))

    @staticmethod
    def _called(name: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"a rank waited in a collective ({name}) for tokenization")

        return fail


def _ranks(tmp_path: Path, tok, train: str) -> list[Run]:
    cfg = TrainConfig(
        train_files=[train], output_dir=str(tmp_path / "out"), max_length=32, cache_dir=str(tmp_path / "cache"),
        tokenize_procs=1,
    )  # fmt: skip
    template = get_template("openchatkit", tok)
    return [Run(cfg, rank, 2, torch.device("cpu"), tok, template, 0, SFT) for rank in (0, 1)]


def _both(ranks: list[Run], train: str, slow_s: float, monkeypatch) -> list:
    """load_sets on rank 1 (started first) and rank 0 (tokenizing, `slow_s` slower), in threads."""
    import chatkit.train.data as train_data

    real = train_data.write_entry

    def slow(*args, **kwargs):
        time.sleep(slow_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_data, "write_entry", slow)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    results: list = [None, None]

    def go(rank: int) -> None:
        try:
            results[rank] = load_sets([train], ranks[rank])
        except Exception as e:
            results[rank] = e

    threads = [threading.Thread(target=go, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=60)
    return results


def test_ranks_wait_for_the_first_ranks_tokenization_without_a_collective(
    tmp_path, make_wordlevel_tokenizer, monkeypatch
):
    """A run started without the launcher: rank 0 tokenizes, rank 1 waits by watching the cache."""
    _NoCollectives(monkeypatch)
    train = _conversations(tmp_path / "train.jsonl", 24)
    ranks = _ranks(tmp_path, make_wordlevel_tokenizer(), train)
    start = time.monotonic()
    (zero,), (one,) = _both(ranks, train, 1.5, monkeypatch)
    assert time.monotonic() - start >= 1.5  # rank 1 did wait for rank 0
    assert len(zero) == len(one) == 24 and np.array_equal(zero.tokens, one.tokens)


def test_waiting_ranks_learn_of_the_first_ranks_failure(tmp_path, make_wordlevel_tokenizer, monkeypatch):
    _NoCollectives(monkeypatch)
    bad = _conversations(tmp_path / "bad.jsonl", 24, bad_line=7)
    ranks = _ranks(tmp_path, make_wordlevel_tokenizer(), bad)
    stale = CacheEntry.of(bad, ranks[0].tokenizer, ranks[0].template, 32, cache_dir=tmp_path / "cache").failed
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("an earlier run's failure")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # older than this process: not this run's
    zero, one = _both(ranks, bad, 1.0, monkeypatch)
    for e in (zero, one):
        assert isinstance(e, RunError) and e.all_ranks, e
        assert str(e).startswith(f"{bad}:7: messages[0].role: must be one of ") and str(e) == str(zero)


# --- through the real launcher and DeepSpeed's runner (slow) ------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    root = tmp_path_factory.mktemp("store_runs")
    train, _ = make_splits(160, 0, seed=2)
    write_conversations(root / "train.jsonl", train)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "base"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    return root / "base", root / "train.jsonl"


def _settings(tmp_path: Path, base: Path, train: Path) -> list[str]:
    return [
        "--config", "config/tiny.yaml", f"model={base}", f"train_files=[{train}]", f"output_dir={tmp_path / 'out'}",
        f"cache_dir={tmp_path / 'cache'}", "max_steps=2", "log_every=1", "warmup_steps=0", "max_length=128",
        "micro_batch_size=2", "save_every=0", "tokenize_procs=1",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    drop = ("CHATKIT_CPU_RANKS", "MASTER_PORT", "CHATKIT_VERBOSE", "LOCAL_RANK", "RANK", "WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_launch_tokenizes_before_the_ranks_which_only_map_the_cache(tmp_path, tiny_run_inputs):
    base, train = tiny_run_inputs
    cmd = [sys.executable, "-m", "chatkit.launch", *_settings(tmp_path, base, train)[1:], "--cpu-ranks", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert re.search(r"tokenized in [\d.]+s: \S+train.jsonl: \d+ conversations kept", r.stderr), r.stderr[
        -2000:
    ]
    log = (tmp_path / "out" / "train.log").read_text()
    assert "step 2/2" in log and "not in the tokenization cache" not in log
    (entry,) = (tmp_path / "cache").glob("train-*")
    assert entry.stat().st_mtime < (tmp_path / "out" / "train.log").stat().st_ctime  # before the ranks


SLOW_TOKENIZER = textwrap.dedent(
    """
    # Loaded by every Python process of the test's run (PYTHONPATH); acts in the training ranks only.
    import os, sys

    if sys.argv and sys.argv[0].endswith("train.py"):
        import datetime, time
        import torch.distributed as dist
        import chatkit.data

        timeout = datetime.timedelta(seconds=float(os.environ["TEST_PG_TIMEOUT_S"]))
        join = dist.init_process_group

        def init_process_group(*args, **kwargs):  # DeepSpeed's own call: collectives then time out fast
            join(*args, **kwargs)
            dist.distributed_c10d._set_pg_timeout(timeout)

        dist.init_process_group = init_process_group
        tokenize_chunk = chatkit.data._tokenize_chunk

        def slow_chunk(args):  # a large data set: tokenizing outlasts the timeout
            time.sleep(float(os.environ["TEST_TOKENIZE_S"]))
            return tokenize_chunk(args)

        chatkit.data._tokenize_chunk = slow_chunk
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_first_run_that_tokenizes_for_longer_than_the_timeout_trains(tmp_path, tiny_run_inputs):
    """Started without the launcher (so the ranks tokenize), with the process group's timeout at 10 s
    and rank 0's tokenization taking 25 s: rank 1 waits outside any collective, and the run trains.
    (With the barrier it replaced, rank 1's wait failed after the timeout, and every retry with it.)"""
    base, train = tiny_run_inputs
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_TOKENIZER)
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "critical", "--num_gpus", "2",
        "--master_port", str(launch.free_port()), str(REPO / "training" / "train.py"), *_settings(tmp_path, base, train),
    ]  # fmt: skip
    env = _env(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TEST_PG_TIMEOUT_S="10", TEST_TOKENIZE_S="25",
        PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert time.monotonic() - start > 25
    log = (tmp_path / "out" / "train.log").read_text()
    assert "not in the tokenization cache" in log and "step 2/2" in log
