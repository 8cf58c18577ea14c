"""Every data/<name>/prepare.py on a small fixture in its upstream's format, and the shared library.

Text fixtures live in tests/fixtures/datasets/<name>/; the binary upstream formats (parquet,
.jsonl.gz, .jsonl.zst) are written into tmp_path from the fixture rows, so the repository stays text.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from chatkit.conversation import Message, read_jsonl
from chatkit.datasets import get_dataset, list_datasets, oig
from chatkit.datasets.prepare import NothingKept, Options, in_val, prepare, recipe_runs, run
from chatkit.datasets.sources import DatasetError, iter_rows
from chatkit.datasets.spec import UNHELPFUL_MARKER, DatasetSpec, field

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "datasets"
PREFERENCE = {"anthropic_hh", "webgpt", "summarize_from_feedback"}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_lines(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def words(n: int) -> str:
    return " ".join(["word"] * n)


def make_source(name: str, tmp: Path) -> Path:
    """The --source for a dataset's fixture, laid out as the upstream publishes it."""
    src = tmp / "upstream"
    if name == "dolly":  # rows at OpenAlpaca's limit: 2,000 words kept, 2,001 skipped
        extra = [
            {
                "instruction": words(1000),
                "context": words(500),
                "response": words(500),
                "category": "open_qa",
            },
            {
                "instruction": words(1000),
                "context": words(500),
                "response": words(501),
                "category": "open_qa",
            },
        ]
        write_lines(
            rows_of(FIX / "dolly" / "databricks-dolly-15k.jsonl") + extra, src / "databricks-dolly-15k.jsonl"
        )
    elif name in ("alpaca", "koalpaca"):
        write_parquet(rows_of(FIX / name / "rows.jsonl"), src / "data" / "train-00000-of-00001.parquet")
    elif name == "anthropic_hh":
        for part in ("harmless-base", "helpful-base"):
            write_lines(rows_of(FIX / name / f"{part}.jsonl"), src / part / "train.jsonl.gz")
        write_lines(
            [{"transcript": "not a preference pair"}],
            src / "red-team-attempts" / "red_team_attempts.jsonl.gz",
        )
    elif name == "webgpt":
        write_parquet(rows_of(FIX / name / "rows.jsonl"), src / "default" / "train" / "0000.parquet")
    elif name == "summarize_from_feedback":
        return FIX / name / "comparisons" / "batch3.json"
    elif name == "mqa":
        write_lines(
            rows_of(FIX / name / "rows.jsonl"), src / "fine-tune" / "natural_questions_10_200_docs.jsonl.zst"
        )
    elif name == "booksum":
        write_lines(rows_of(FIX / name / "rows.jsonl"), src / "fine-tune" / "booksum.jsonl.zst")
    else:  # OIG, sharegpt, hc3: the fixture folder is the upstream layout
        return FIX / name
    return src


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _long(name: str, line: int) -> list[dict]:
    row = rows_of(FIX / name / "rows.jsonl")[line]
    return msgs(("user", row["prompt"].strip()), ("assistant", row["completion"].strip()))


# name -> (rows read, conversations written, skips by reason, conversations that must be written)
EXPECTED: dict[str, tuple[int, int, dict[str, int], list[list[dict]]]] = {
    "OIG": (
        6,
        3,
        {"does not end with an assistant message": 1, "empty message": 1, "no <human>:/<bot>: turns": 1},
        [
            msgs(
                ("user", "Can you help me plan a trip?"),
                ("assistant", "Of course! Where would you like to go?"),
                ("user", "Japan, in April."),
                ("assistant", "April is cherry blossom season, so book early and visit Kyoto."),
            ),
            msgs(
                ("user", "Background: Alice and Bob are neighbours.\nDid you hear that noise last night?"),
                ("assistant", "Yes, it was the storm knocking over my fence."),
            ),
        ],
    ),
    "dolly": (
        6,
        4,
        {"empty message": 1, "over 2000 words (OpenAlpaca's length filter)": 1},
        [
            msgs(
                (
                    "user",
                    "When did Virgin Australia start operating?\n\n### Input:\nVirgin Australia, the trading name of "
                    "Virgin Australia Airlines Pty Ltd, is an Australian-based airline. It commenced services on "
                    "31 August 2000 as Virgin Blue, with two aircraft on a single route.",
                ),
                (
                    "assistant",
                    "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a "
                    "single route.",
                ),
            ),
            msgs(("user", "Which is a species of fish? Tope or Rope"), ("assistant", "Tope")),
        ],
    ),
    "alpaca": (
        3,
        2,
        {"empty message": 1},
        [
            msgs(
                ("user", "Translate the sentence into French.\n\n### Input:\nThe cat sleeps on the sofa."),
                ("assistant", "Le chat dort sur le canapé."),
            ),
            msgs(
                ("user", "Give three tips for staying healthy."),
                ("assistant", "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."),
            ),
        ],
    ),
    "koalpaca": (
        2,
        2,
        {},
        [
            msgs(
                ("user", "양파는 어떤 식물 부위인가요? 그리고 고구마는 뿌리인가요?"),
                ("assistant", "양파는 잎이 아닌 식물의 줄기 부분입니다. 고구마는 식물의 뿌리 부분입니다."),
            )
        ],
    ),
    "sharegpt": (
        5,
        2,
        {"unknown role 'bard'": 1, "does not end with an assistant message": 1, "empty message": 1},
        [
            msgs(("system", "You are a terse assistant."), ("user", "What is 2 + 2?"), ("assistant", "4")),
            msgs(
                ("user", "Summarize the main ideas of Jeff Walker's Product Launch Formula."),
                (
                    "assistant",
                    "Product Launch Formula builds anticipation before a launch with a sequence of free content.",
                ),
                ("user", "Give me three examples of pre-launch content."),
                ("assistant", "1. A how-to video\n2. A case study\n3. A live Q&A"),
            ),
        ],
    ),
    "hc3": (
        4,
        6,
        {"no answers": 1, "empty message": 1},
        [
            msgs(("user", "What is a credit score?"), ("assistant", "It summarises your borrowing history.")),
            msgs(
                ("user", "What is a credit score?"),
                ("assistant", "A credit score is a numerical estimate of a person's creditworthiness."),
            ),
            msgs(
                ("user", "Is coffee bad for you?"),
                ("assistant", "In moderation, coffee is safe for most adults."),
            ),
        ],
    ),
    "anthropic_hh": (
        4,
        3,
        {"empty message": 1},
        [
            msgs(
                ("user", "How do I boil an egg?"),
                ("assistant", "Put it in boiling water for about nine minutes."),
                ("user", "And for a soft yolk?"),
                ("assistant", "Take it out after six minutes and cool it in cold water."),
            )
        ],
    ),
    "webgpt": (
        3,
        2,
        {"tie (equal scores)": 1},
        [
            msgs(
                ("user", "How do vaccines work?"),
                (
                    "assistant",
                    "Vaccines train the immune system to recognise a pathogen without causing the disease [1].",
                ),
            )
        ],
    ),
    "summarize_from_feedback": (
        3,
        2,
        {"no post or article": 1},
        [
            msgs(
                (
                    "user",
                    "Summarize this Reddit post in a few sentences.\n\nSUBREDDIT: r/relationships\nTITLE: Roommate "
                    "eats my food\nPOST: My roommate keeps eating my food even after I labelled it. I don't want to "
                    "fight, but it's getting expensive. What should I do?",
                ),
                ("assistant", "Roommate keeps eating my labelled food; how do I raise it without a fight?"),
            ),
            msgs(
                (
                    "user",
                    "Summarize this article in a few sentences.\n\nTITLE: Storm hits the coast\nARTICLE: A strong "
                    "storm hit the coast on Monday, cutting power to thousands of homes.",
                ),
                ("assistant", "A storm cut power to thousands of coastal homes on Monday."),
            ),
        ],
    ),
    "mqa": (3, 2, {"no prompt/completion fields": 1}, [_long("mqa", 1)]),
    "booksum": (2, 2, {}, [_long("booksum", 0)]),
}

SUMMARY = re.compile(
    r"^read (\d+) rows, wrote (\d+) train \+ (\d+) val conversations, skipped (\d+)(?:: (.*))?$"
)


def parse_summary(stdout: str) -> tuple[int, int, int, dict[str, int]]:
    m = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert m, stdout
    skips = dict((r, int(n)) for r, n in re.findall(r"(.+?) \((\d+)\)(?:, |$)", m[5] or ""))
    assert sum(skips.values()) == int(m[4])
    return int(m[1]), int(m[2]), int(m[3]), skips


def outputs(out: Path) -> tuple[list[dict], list[dict]]:
    return rows_of(out / "train.jsonl"), rows_of(out / "val.jsonl")


def script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"data/{name}/prepare.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


# --- every script on its fixture ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_prepare_script_on_fixture(name: str, tmp_path: Path):
    out = tmp_path / "out"
    proc = script(
        name, "--source", str(make_source(name, tmp_path)), "--out", str(out), "--val-fraction", "0.3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, written, skips, examples = EXPECTED[name]
    n_rows, n_train, n_val, got_skips = parse_summary(proc.stdout)
    assert (n_rows, n_train + n_val, got_skips) == (rows, written, skips)
    train, val = outputs(out)
    assert (len(train), len(val)) == (n_train, n_val)
    assert {c["source"] for c in train + val} == {name}
    for conversation in examples:
        assert conversation in [c["messages"] for c in train + val]
    for reason in skips:  # each reason points at the first row it skipped
        assert re.search(rf"^{re.escape(reason)}: first skipped at \S+", proc.stdout, re.M), proc.stdout
    read_jsonl(out / "train.jsonl")  # the foundation's reader accepts the output


@pytest.mark.parametrize("name", list_datasets())
def test_script_help(name: str):
    proc = script(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")
    spec = get_dataset(name)
    if spec.repo is None:  # a local --source only (data/preference): the help says it is required
        assert "upstream: none to download" in proc.stdout and "--source PATH " in proc.stdout
    else:
        assert f"https://huggingface.co/datasets/{spec.repo}" in proc.stdout
    assert "--source" in proc.stdout and "--out" in proc.stdout and "--val-fraction" in proc.stdout
    assert ("--keep-rejected" in proc.stdout) == (name in PREFERENCE)


def test_registry_matches_data_folders():
    # demo is synthetic and the Wikipedia folder holds a retrieval index: neither is a conversation dataset
    not_datasets = {"demo", "wikipedia-3sentence-level-retrieval-index"}
    folders = {p.parent.name for p in (REPO / "data").glob("*/prepare.py")} - not_datasets
    assert set(list_datasets()) == folders
    for name in list_datasets():
        spec = get_dataset(name)
        assert spec.name == name and spec.files and spec.description
        assert (spec.rejected is not None) == (name in PREFERENCE)
        assert (REPO / "data" / name / "README.md").is_file()
    with pytest.raises(KeyError, match="unknown dataset 'nope'; known: OIG"):
        get_dataset("nope")


# --- preference sets: --keep-rejected -------------------------------------------------------------


def _prepare(
    name: str, source: Path, out: Path, *args: str, capsys=None
) -> tuple[list[dict], dict[str, int]]:
    prepare(get_dataset(name), ["--source", str(source), "--out", str(out), "--val-fraction", "0", *args])
    stdout = capsys.readouterr().out
    _, _, n_val, skips = parse_summary(stdout)
    train, val = outputs(out)
    assert n_val == 0 and val == []
    return train, skips


def test_keep_rejected_anthropic_hh(tmp_path: Path, capsys):
    train, skips = _prepare(
        "anthropic_hh",
        make_source("anthropic_hh", tmp_path),
        tmp_path / "out",
        "--keep-rejected",
        capsys=capsys,
    )
    assert skips == {"empty message": 1, "rejected: rejected reply identical to the chosen one": 1}
    rejected = [c["messages"] for c in train if c["source"] == "anthropic_hh/rejected"]
    assert len(rejected) == 3 and len(train) == 6
    assert (
        msgs(
            ("user", "How do I boil an egg?"),
            ("assistant", "Put it in boiling water for about nine minutes."),
            ("user", f"And for a soft yolk?\n\n{UNHELPFUL_MARKER}"),
            ("assistant", "Eggs are always hard."),
        )
        in rejected
    )
    # Without the flag no rejected answer is written.
    train, _ = _prepare(
        "anthropic_hh", make_source("anthropic_hh", tmp_path), tmp_path / "plain", capsys=capsys
    )
    assert {c["source"] for c in train} == {"anthropic_hh"}


def test_keep_rejected_webgpt_and_summaries(tmp_path: Path, capsys):
    train, skips = _prepare(
        "webgpt", make_source("webgpt", tmp_path), tmp_path / "w", "--keep-rejected", capsys=capsys
    )
    assert skips == {"tie (equal scores)": 1} and len(train) == 4
    assert {
        "messages": msgs(
            ("user", f"How do vaccines work?\n\n{UNHELPFUL_MARKER}"), ("assistant", "They inject something.")
        ),
        "source": "webgpt/rejected",
    } in train
    train, skips = _prepare(
        "summarize_from_feedback",
        make_source("summarize_from_feedback", tmp_path),
        tmp_path / "s",
        "--keep-rejected",
        capsys=capsys,
    )
    assert skips == {"no post or article": 1} and len(train) == 4
    assert train[1]["source"] == "summarize_from_feedback/rejected"
    assert train[1]["messages"][0]["content"].endswith(f"What should I do?\n\n{UNHELPFUL_MARKER}")
    assert train[1]["messages"][1] == {"role": "assistant", "content": "Roommate eats my food"}


def test_webgpt_reads_openai_raw_pairs(tmp_path: Path, capsys):
    train, skips = _prepare("webgpt", FIX / "webgpt" / "comparisons.jsonl", tmp_path / "out", capsys=capsys)
    assert skips == {"tie (equal scores)": 1}
    assert [c["messages"] for c in train] == [
        msgs(
            ("user", "Why do cats purr?"),
            ("assistant", "Cats purr to communicate contentment and to soothe themselves [1]."),
        )
    ]


def test_keep_rejected_is_refused_where_there_is_no_rejected_answer(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare(
            get_dataset("dolly"), ["--source", str(FIX / "dolly"), "--out", str(tmp_path), "--keep-rejected"]
        )
    assert e.value.code == 2
    assert "unrecognized arguments: --keep-rejected" in capsys.readouterr().err


# --- bad input --------------------------------------------------------------------------------------


def _error(spec: DatasetSpec, source: Path, out: Path) -> str:
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--source", str(source), "--out", str(out)])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert not (out / "train.jsonl").exists() and not (out / "val.jsonl").exists()  # nothing half-written
    return e.value.code


def test_empty_transcripts_are_counted_not_dropped(tmp_path: Path):
    write_lines(
        [{"chosen": "", "rejected": ""}, {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}],
        src := tmp_path / "t.jsonl",
    )
    with pytest.raises(NothingKept) as e:  # every row skipped: the run fails, naming the skips
        run(get_dataset("anthropic_hh"), Options(out=tmp_path / "out", source=src, keep_rejected=True))
    counts = e.value.counts
    assert (counts.rows, counts.written) == (2, 0)
    assert not (tmp_path / "out").exists()
    assert counts.skipped == {
        "no messages": 1,
        "rejected: no messages": 1,
        "does not end with an assistant message": 1,
        "rejected: does not end with an assistant message": 1,
    }
    assert counts.first_skip["no messages"] == f"{src}:1"


def test_malformed_line_names_file_and_line(tmp_path: Path):
    good = (FIX / "dolly" / "databricks-dolly-15k.jsonl").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "databricks-dolly-15k.jsonl"
    bad.write_text(
        "\n".join([good[0], good[1], '{"instruction": "cut off', good[2]]) + "\n", encoding="utf-8"
    )
    message = _error(get_dataset("dolly"), bad, tmp_path / "out")
    assert f"{bad}:3: invalid JSON (Unterminated string" in message


def test_missing_field_names_file_line_and_field(tmp_path: Path):
    src = tmp_path / "databricks-dolly-15k.jsonl"
    write_lines(
        [{"instruction": "Hi", "context": "", "response": "Hello"}, {"instruction": "Hi", "context": ""}], src
    )
    assert _error(get_dataset("dolly"), src, tmp_path / "out") == f"error: {src}:2: field 'response': missing"
    src = tmp_path / "sharegpt.json"
    src.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": 3}]}]))
    message = _error(get_dataset("sharegpt"), src, tmp_path / "out")
    assert message == f"error: {src}[0]: field 'conversations'[0].value: expected str, got int"


def test_mapping_bug_is_caught_by_validation_with_its_row(tmp_path: Path):
    spec = DatasetSpec(
        name="buggy",
        repo="nobody/buggy",
        files=("*.jsonl",),
        to_conversations=lambda row: [[Message("user", field(row, "q")), Message("bot", "oops")]],
        description="a mapping that invents a role",
    )
    src = tmp_path / "rows.jsonl"
    write_lines([{"q": "hello"}], src)
    message = _error(spec, src, tmp_path / "out")
    assert f"{src}:1: messages[1].role: must be one of system, user, assistant, tool, got 'bot'" in message


def test_unknown_format_and_empty_folder(tmp_path: Path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    assert "rows.csv: unknown format" in _error(get_dataset("dolly"), tmp_path / "rows.csv", tmp_path / "o")
    assert "no files matching databricks-dolly-15k.jsonl" in _error(
        get_dataset("dolly"), tmp_path, tmp_path / "o"
    )


def test_offline_download_suggests_source(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = script("alpaca", "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1
    assert "could not download tatsu-lab/alpaca from the Hugging Face hub" in proc.stderr
    assert "pass --source PATH" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_download_fetches_the_spec_files_from_the_hub(tmp_path: Path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id: str, **kwargs) -> str:  # stands in for the hub: lays out its files
        calls.append((repo_id, kwargs))
        rows = rows_of(FIX / "summarize_from_feedback" / "comparisons" / "batch3.json")
        write_parquet(rows, tmp_path / "snapshot" / "comparisons" / "train" / "0000.parquet")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    prepare(get_dataset("summarize_from_feedback"), ["--out", str(tmp_path / "out"), "--val-fraction", "0"])
    assert calls == [
        (
            "openai/summarize_from_feedback",
            {
                "repo_type": "dataset",
                "revision": "refs/convert/parquet",
                "allow_patterns": ["comparisons/*train*.parquet"],
            },
        )
    ]
    assert parse_summary(capsys.readouterr().out) == (3, 2, 0, {"no post or article": 1})
    assert outputs(tmp_path / "out")[0][0]["messages"] == EXPECTED["summarize_from_feedback"][3][0]


# --- reading and splitting --------------------------------------------------------------------------


def test_json_formats(tmp_path: Path):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(rows))
    lines = tmp_path / "lines.json"
    write_lines(rows, lines)
    assert list(iter_rows(columns)) == [(f"{columns}[0]", rows[0]), (f"{columns}[1]", rows[1])]
    assert list(iter_rows(listed)) == [(f"{listed}[0]", rows[0]), (f"{listed}[1]", rows[1])]
    assert list(iter_rows(lines)) == [(f"{lines}:1", rows[0]), (f"{lines}:2", rows[1])]
    write_lines(rows[:1], one := tmp_path / "one.json")  # JSON lines holding a single row
    assert list(iter_rows(one)) == [(f"{one}:1", rows[0])]
    (tmp_path / "ragged.json").write_text(json.dumps({"a": [1, 2], "b": [1]}))
    with pytest.raises(DatasetError, match="columns have different lengths"):
        list(iter_rows(tmp_path / "ragged.json"))


def test_split_is_deterministic_by_seed_and_keeps_a_rows_conversations_together(tmp_path: Path):
    rows = [
        {"question": f"Question {i}?", "human_answers": [f"Human {i}"], "chatgpt_answers": [f"ChatGPT {i}"]}
        for i in range(40)
    ]
    write_lines(rows, src := tmp_path / "all.jsonl")
    spec = get_dataset("hc3")

    def split(seed: int, out: str) -> tuple[list[dict], list[dict]]:
        counts = run(spec, Options(out=tmp_path / out, source=src, val_fraction=0.5, seed=seed))
        assert (counts.rows, counts.written) == (40, 80)
        return outputs(tmp_path / out)

    train, val = split(0, "a")
    assert 0 < len(val) < 80 and split(0, "b") == (train, val)
    assert split(1, "c") != (train, val)
    sides = Counter(c["messages"][0]["content"] for c in val)
    assert set(sides.values()) == {2}  # both answers to a question are on the same side
    expected_val = {f"Question {i}?" for i in range(40) if in_val(0, "all.jsonl", i, 0.5)}
    assert set(sides) == expected_val


def test_limit_stops_early(tmp_path: Path, capsys):
    prepare(get_dataset("OIG"), ["--source", str(FIX / "OIG"), "--out", str(tmp_path), "--limit", "2"])
    assert parse_summary(capsys.readouterr().out)[:3] == (2, 2, 0)


def test_files_overrides_the_globs(tmp_path: Path, capsys):
    argv = ["--source", str(FIX / "OIG"), "--out", str(tmp_path), "--files", "unified_soda_dialog.jsonl"]
    prepare(get_dataset("OIG"), argv)
    assert parse_summary(capsys.readouterr().out) == (2, 1, 0, {"no <human>:/<bot>: turns": 1})


def test_keep_existing_outputs_when_a_run_fails(tmp_path: Path):
    out = tmp_path / "out"
    run(get_dataset("hc3"), Options(out=out, source=FIX / "hc3"))
    before = (out / "train.jsonl").read_text()
    shutil.copy(FIX / "hc3" / "all.jsonl", bad := tmp_path / "all.jsonl")
    with bad.open("a") as f:
        f.write("not json\n")
    with pytest.raises(DatasetError, match=r"all.jsonl:5: invalid JSON"):
        run(get_dataset("hc3"), Options(out=out, source=bad))
    assert (out / "train.jsonl").read_text() == before


# --- malformed and foreign inputs: one line, no traceback, non-zero exit, nothing written --------


def _foreign_inputs(tmp: Path) -> dict[str, tuple[str, Path, str]]:
    """id -> (script, --source, what the one-line error must say); the inputs an operator tried."""
    tmp.mkdir(parents=True, exist_ok=True)
    alpaca = tmp / "alpaca_data.jsonl"
    write_lines(rows_of(FIX / "alpaca" / "rows.jsonl"), alpaca)
    not_utf8 = tmp / "latin1.json"  # a ShareGPT file saved as Latin-1: "café" is one byte 0xe9
    not_utf8.write_bytes(b'[{"id": "a",\n  "conversations": [{"from": "human", "value": "caf\xe9"}]}]\n')
    strings = tmp / "strings.json"
    strings.write_text(json.dumps(["What is 2 + 2?", "4"]))
    deep = tmp / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    dpo = tmp / "dpo.json"  # ShareGPT-style preference rows (LLaMA-Factory): the turns end with the user
    dpo.write_text(
        json.dumps(
            [
                {
                    "conversations": [{"from": "human", "value": f"Question {i}?"}],
                    "chosen": {"from": "gpt", "value": "A good answer."},
                    "rejected": {"from": "gpt", "value": "A bad one."},
                }
                for i in range(3)
            ]
        )
    )
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    return {
        "json-not-utf8": (
            "sharegpt",
            not_utf8,
            f"error: {not_utf8}: line 2, column 52: not UTF-8 (byte 0xe9)",
        ),
        "json-list-of-strings": (
            "sharegpt",
            strings,
            f"error: {strings}[0]: expected a JSON object, got str",
        ),
        "json-nested-too-deeply": ("sharegpt", deep, f"error: {deep}: JSON nested too deeply to read"),
        "dpo-to-sharegpt": (
            "sharegpt",
            dpo,
            f"error: {dpo}: wrote nothing: all 3 rows read were skipped (does not end with an assistant "
            f"message: 3, first at {dpo}[0]); is it in sharegpt's upstream format?",
        ),
        "empty-jsonl": ("dolly", empty, f"error: {empty}: wrote nothing: no rows to read (empty input)"),
        "alpaca-to-mqa": (
            "mqa",
            alpaca,
            f"error: {alpaca}: wrote nothing: all 3 rows read were skipped (no prompt/completion fields: 3, "
            f"first at {alpaca}:1); is it in mqa's upstream format?",
        ),
        "alpaca-to-booksum": (
            "booksum",
            alpaca,
            f"error: {alpaca}: wrote nothing: all 3 rows read were skipped (no prompt/completion fields: 3, "
            f"first at {alpaca}:1); is it in booksum's upstream format?",
        ),
    }


FOREIGN = [
    "json-not-utf8", "json-list-of-strings", "json-nested-too-deeply", "dpo-to-sharegpt", "empty-jsonl",
    "alpaca-to-mqa", "alpaca-to-booksum",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_input_fails_in_one_line(case: str, tmp_path: Path):
    name, source, message = _foreign_inputs(tmp_path / "in")[case]
    out = tmp_path / "out"
    proc = script(name, "--source", str(source), "--out", str(out))
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not out.exists()  # nothing written, not even an empty folder


def test_foreign_inputs_are_all_covered(tmp_path: Path):
    assert sorted(_foreign_inputs(tmp_path)) == sorted(FOREIGN)


def test_nothing_kept_leaves_earlier_outputs(tmp_path: Path):
    out = tmp_path / "out"
    run(get_dataset("mqa"), Options(out=out, source=FIX / "mqa" / "rows.jsonl", val_fraction=0))
    before = (out / "train.jsonl").read_text()
    alpaca = FIX / "alpaca" / "rows.jsonl"
    with pytest.raises(NothingKept, match=r"wrote nothing: all 3 rows read were skipped"):
        run(get_dataset("mqa"), Options(out=out, source=alpaca, val_fraction=0))
    assert (out / "train.jsonl").read_text() == before and (out / "val.jsonl").read_text() == ""


def test_all_kept_rows_held_out_is_an_error(tmp_path: Path):
    seed = next(s for s in range(1000) if in_val(s, "rows.jsonl", 0, 0.5))
    src = FIX / "koalpaca" / "rows.jsonl"
    with pytest.raises(NothingKept, match=r"wrote nothing: all 1 conversations kept fell in the held-out"):
        run(
            get_dataset("koalpaca"),
            Options(out=tmp_path / "o", source=src, val_fraction=0.5, seed=seed, limit=1),
        )


def test_empty_val_split_is_written_with_a_warning(tmp_path: Path, capsys):
    src = FIX / "koalpaca" / "rows.jsonl"
    seed = next(s for s in range(1000) if not any(in_val(s, "rows.jsonl", i, 0.1) for i in range(2)))
    argv = ["--source", str(src), "--out", str(tmp_path), "--val-fraction", "0.1", "--seed", str(seed)]
    prepare(get_dataset("koalpaca"), argv)
    captured = capsys.readouterr()
    assert parse_summary(captured.out)[:3] == (2, 2, 0)
    assert captured.err.strip() == (
        f"warning: {tmp_path / 'val.jsonl'} is empty: none of the 2 rows fell in the held-out 0.1 share; "
        "leave it out of val_files, or raise --val-fraction"
    )
    assert (tmp_path / "val.jsonl").read_text() == ""  # written, so an older val.jsonl does not linger
    prepare(get_dataset("koalpaca"), ["--source", str(src), "--out", str(tmp_path), "--val-fraction", "0"])
    assert capsys.readouterr().err == ""  # no held-out share asked for: nothing to warn about


def test_reading_errors_name_the_line(tmp_path: Path):
    good = json.dumps({"instruction": "a", "context": "", "response": "b"}) + "\n"
    data = (good * 400).encode() + b'{"instruction": "caf\xe9"}\n'  # line 401, past the first read chunk
    for name in ("rows.jsonl", "rows.jsonl.gz", "rows.jsonl.zst"):
        write_lines([], path := tmp_path / name)
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(data))
        elif name.endswith(".zst"):
            import zstandard

            path.write_bytes(zstandard.ZstdCompressor().compress(data))
        else:
            path.write_bytes(data)
        with pytest.raises(DatasetError) as e:
            list(iter_rows(path))
        assert str(e.value) == f"{path}: line 401, column 21: not UTF-8 (byte 0xe9); re-encode it as UTF-8"
    deep = tmp_path / "deep.jsonl"
    deep.write_text(good + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(deep))}:2: JSON nested too deeply"):
        list(iter_rows(deep))
    bom = tmp_path / "bom.json"  # a byte-order mark, as Windows editors write, is not an error
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"a": 1}]).encode())
    assert list(iter_rows(bom)) == [(f"{bom}[0]", {"a": 1})]
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_bytes(b"\xef\xbb\xbf" + good.encode() * 2)
    assert [w for w, _ in iter_rows(bom_lines)] == [f"{bom_lines}:1", f"{bom_lines}:2"]


def test_a_row_the_mapping_cannot_read_is_named(tmp_path: Path):
    spec = DatasetSpec(
        name="fragile",
        repo="nobody/fragile",
        files=("*.json",),
        to_conversations=lambda row: [[Message("user", row["q"].strip())]],  # KeyError, AttributeError
        description="a mapping that trusts its rows",
    )
    src = tmp_path / "rows.json"
    src.write_text(json.dumps([{"x": 1}]))
    message = _error(spec, src, tmp_path / "out")
    assert message == (
        f"error: {src}[0]: cannot map this row (KeyError: 'q'); is it in fragile's upstream format?"
    )


# --- a --source folder holding the upstream in another of its formats -------------------------------

UPSTREAM_SETS = [n for n in list_datasets() if get_dataset(n).repo is not None]  # all but `preference`


def _rewrite(rows: list, path: Path) -> None:
    """Rows in the format `path`'s name says: parquet, a JSON list, or JSON lines (plain, .gz, .zst)."""
    if path.name.endswith(".parquet"):
        write_parquet(rows, path)
    elif path.name.endswith(".json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        write_lines(rows, path)


def other_format_source(name: str, tmp: Path) -> Path:
    """The fixture rows of `name` under a folder, in a format its default globs do not match."""
    src = tmp / "other-format"
    fixture = rows_of(FIX / name / "rows.jsonl") if (FIX / name / "rows.jsonl").is_file() else None
    if name == "OIG":  # the unified files as .jsonl.gz, beside a README that is not data
        for f in ("unified_chip2", "unified_soda_dialog"):
            _rewrite(rows_of(FIX / name / f"{f}.jsonl"), src / f"{f}.jsonl.gz")
        shutil.copy(FIX / name / "README.md", src / "README.md")
    elif name == "dolly":  # default: databricks-dolly-15k.jsonl
        _rewrite(
            rows_of(make_source(name, tmp) / "databricks-dolly-15k.jsonl"),
            src / "databricks-dolly-15k.parquet",
        )
    elif name == "alpaca":  # default *.parquet: Stanford's original JSON list
        _rewrite(fixture, src / "alpaca_data.json")
    elif name == "koalpaca":  # default *.parquet: the GitHub release's JSON lines
        _rewrite(fixture, src / "KoAlpaca_v1.1.jsonl")
    elif name == "sharegpt":  # default: the .json list; here JSON lines
        rows = json.loads((FIX / name / "ShareGPT_V3_unfiltered_cleaned_split.json").read_text())
        _rewrite(rows, src / "ShareGPT_V3_unfiltered_cleaned_split.jsonl")
    elif name == "hc3":  # default all.jsonl: the one-file-a-domain release, as parquet
        for row in rows_of(FIX / name / "all.jsonl"):
            _rewrite([row], src / f"{row['source']}.parquet")
    elif name == "anthropic_hh":  # default */train.jsonl.gz: decompressed; red-team stays unread
        for part in ("harmless-base", "helpful-base"):
            _rewrite(rows_of(FIX / name / f"{part}.jsonl"), src / part / "train.jsonl")
        _rewrite(
            [{"transcript": "not a preference pair"}], src / "red-team-attempts" / "red_team_attempts.jsonl"
        )
    elif name == "webgpt":  # default *.parquet: JSON lines
        _rewrite(fixture, src / "comparisons.jsonl")
    elif name == "summarize_from_feedback":  # default comparisons/*train*.parquet: OpenAI's batch files
        shutil.copytree(FIX / name / "comparisons", src / "comparisons")
    elif name == "mqa":  # default .jsonl.zst: decompressed
        _rewrite(fixture, src / "fine-tune" / "natural_questions_10_200_docs.jsonl")
    elif name == "booksum":  # default .jsonl.zst: parquet
        _rewrite(fixture, src / "fine-tune" / "booksum.parquet")
    else:
        raise AssertionError(f"no other-format source for {name}: add one")
    return src


def test_other_format_cases_cover_every_upstream_set():
    assert len(UPSTREAM_SETS) == 11 and "preference" not in UPSTREAM_SETS


@pytest.mark.parametrize("name", UPSTREAM_SETS)
def test_source_folder_in_another_format(name: str, tmp_path: Path, capsys, caplog):
    src = other_format_source(name, tmp_path)
    spec = get_dataset(name)
    assert not any(
        fnmatch.fnmatchcase(p.relative_to(src).as_posix(), g) for p in src.rglob("*") for g in spec.files
    )  # the default globs match nothing here
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        prepare(spec, ["--source", str(src), "--out", str(out), "--val-fraction", "0.3"])
    rows, written, skips, examples = EXPECTED[name]
    n_rows, n_train, n_val, got_skips = parse_summary(capsys.readouterr().out)
    assert (n_rows, n_train + n_val, got_skips) == (rows, written, skips)
    train, val = outputs(out)
    for conversation in examples:
        assert conversation in [c["messages"] for c in train + val]
    assert f"no files matching {', '.join(spec.files)}" in caplog.text  # the fallback says what it read
    assert "README.md" not in caplog.text and "red_team" not in caplog.text


def test_source_folder_with_nothing_readable_says_what_it_holds(tmp_path: Path):
    src = tmp_path / "src"
    for f in ("notes.txt", "rows.csv", "sub/readme.md", "a.txt", "b.txt", "c.txt", "d.txt"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("x\n")
    message = _error(get_dataset("dolly"), src, tmp_path / "o")
    assert message.startswith(f"error: {src}: no files matching databricks-dolly-15k.jsonl")
    assert "in any format read here (.json, .jsonl, .jsonl.gz, .jsonl.zst, .parquet)" in message
    assert "a.txt, b.txt, c.txt, d.txt, notes.txt and 2 more" in message  # what the folder holds
    assert "--files" in message
    (empty := tmp_path / "empty").mkdir()
    assert "the folder is empty" in _error(get_dataset("dolly"), empty, tmp_path / "o")
    message = _error(get_dataset("hc3"), empty, tmp_path / "o")  # the upstream's other names, named
    assert "nor the upstream's other files reddit_eli5.jsonl, open_qa.jsonl" in message


def test_other_formats_are_read_once_per_file(tmp_path: Path, capsys):
    """The same rows in two fallback formats are read from one of them, not twice; one release of the
    upstream is never read beside another (HC3's all.jsonl as parquet beside its domain files)."""
    rows = rows_of(FIX / "koalpaca" / "rows.jsonl")
    _rewrite(rows, tmp_path / "src" / "KoAlpaca_v1.1.jsonl")
    _rewrite(rows, tmp_path / "src" / "KoAlpaca_v1.1.json")
    prepare(get_dataset("koalpaca"), ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert parse_summary(capsys.readouterr().out)[0] == 2
    hc3 = rows_of(FIX / "hc3" / "all.jsonl")
    _rewrite(hc3, tmp_path / "hc3" / "all.parquet")
    for row in hc3:
        _rewrite([row], tmp_path / "hc3" / f"{row['source']}.jsonl")
    prepare(get_dataset("hc3"), ["--source", str(tmp_path / "hc3"), "--out", str(tmp_path / "o")])
    assert parse_summary(capsys.readouterr().out)[0] == 4


def test_empty_val_warning_tells_when_the_held_out_rows_were_skipped(tmp_path: Path, capsys):
    rows = [
        {"instruction": "Say hi.", "output": ""},  # skipped: empty message
        {"instruction": "Say yes.", "output": "Yes."},
        {"instruction": "Say no.", "output": "No."},
    ]
    write_lines(rows, src := tmp_path / "rows.jsonl")
    held = [0]
    seed = next(s for s in range(1000) if [i for i in range(3) if in_val(s, "rows.jsonl", i, 0.3)] == held)
    argv = ["--source", str(src), "--out", str(tmp_path / "o"), "--val-fraction", "0.3", "--seed", str(seed)]
    prepare(get_dataset("koalpaca"), argv)
    captured = capsys.readouterr()
    assert parse_summary(captured.out) == (3, 2, 0, {"empty message": 1})
    assert captured.err.strip() == (
        f"warning: {tmp_path / 'o' / 'val.jsonl'} is empty: the 1 of the 3 rows that fell in the held-out "
        "0.3 share was skipped; leave it out of val_files, or raise --val-fraction"
    )


# --- data/OIG/prepare.py --recipe: every folder a recipe reads, in one command ------------------------


def _recipe(path: Path, *entries: str) -> Path:
    path.write_text("model: pretrained/tiny/model\ntrain_files:\n" + "".join(f"  - {e}\n" for e in entries))
    return path


@pytest.mark.parametrize("recipe", ["GPT-NeoXT-Chat-Base-20B", "Pythia-Chat-Base-7B"])
def test_oig_recipe_plans_every_file_of_openchatkits_mixture(recipe: str):
    path = REPO / "config" / f"{recipe}.yaml"
    spec = get_dataset("OIG")
    runs, others = recipe_runs(spec, path, Options(out=Path("unused"), val_fraction=0.01, limit=5))
    entries = [e.rpartition(":")[0] for e in yaml.safe_load(path.read_text())["train_files"]]
    assert len(runs) == len(entries) == 26 and others == []
    for opts, entry in zip(runs, entries, strict=True):
        folder = Path(entry).parent
        assert opts.out == folder and opts.files == (f"{folder.name}.jsonl",)
        assert (opts.limit, opts.val_fraction) == (5, 0.01)  # the other options carry over


def test_oig_recipe_plans_koalas_three_files():
    runs, others = recipe_runs(get_dataset("OIG"), REPO / "config" / "koala.yaml", Options(out=Path("x")))
    assert [(o.out, o.files) for o in runs] == [(Path("data/OIG/files/koala"), oig.KOALA_FILES)]
    assert len(others) == 6 and "data/sharegpt/files/train.jsonl" in others


def test_oig_recipe_prepares_each_folder_where_the_recipe_reads_it(tmp_path: Path, capsys):
    src = tmp_path / "upstream"
    shutil.copytree(FIX / "OIG", src)
    soda = src / "unified_soda_dialog.jsonl"  # one file in another format: the fallback applies too
    write_lines(rows_of(soda), src / "unified_soda_dialog.jsonl.gz")
    soda.unlink()
    files = tmp_path / "data" / "OIG" / "files"
    recipe = _recipe(
        tmp_path / "recipe.yaml",
        f"{files}/unified_chip2/train.jsonl:0.5",
        f"{files}/unified_soda_dialog/train.jsonl",
        f"{tmp_path}/data/sharegpt/files/train.jsonl",
    )
    argv = ["--recipe", str(recipe), "--source", str(src), "--val-fraction", "0"]
    prepare(get_dataset("OIG"), argv)
    out = capsys.readouterr().out
    first, second = out.split("[2/2]")
    assert parse_summary(first) == (
        4, 2, 0, {"does not end with an assistant message": 1, "empty message": 1}
    )  # fmt: skip
    assert parse_summary(second.rsplit("\nprepared ", 1)[0]) == (2, 1, 0, {"no <human>:/<bot>: turns": 1})
    assert f"[1/2] unified_chip2.jsonl -> {files / 'unified_chip2'}" in out
    assert f"{tmp_path}/data/sharegpt/files/train.jsonl" in out  # named as not this script's
    assert len(rows_of(files / "unified_chip2" / "train.jsonl")) == 2
    assert len(rows_of(files / "unified_soda_dialog" / "train.jsonl")) == 1
    assert out.strip().splitlines()[-1].startswith(f"prepared 2 folders for {recipe}")


def test_oig_recipe_errors(tmp_path: Path, capsys):
    spec = get_dataset("OIG")
    recipe = _recipe(tmp_path / "r.yaml", "data/OIG/files/unified_chip2/train.jsonl")
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--recipe", str(recipe), "--files", "unified_chip2.jsonl"])
    assert (
        e.value.code == 2
        and "--recipe writes each folder where the recipe reads it" in capsys.readouterr().err
    )
    none = _recipe(tmp_path / "none.yaml", "data/sharegpt/files/train.jsonl")
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--recipe", str(none), "--source", str(FIX / "OIG")])
    assert e.value.code == f"error: {none} reads no data/OIG/files/ folder"
    mine = _recipe(tmp_path / "mine.yaml", "data/OIG/files/mine/train.jsonl")
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--recipe", str(mine), "--source", str(FIX / "OIG")])
    assert "cannot tell which upstream files data/OIG/files/mine holds" in e.value.code
    assert "--files GLOB --out data/OIG/files/mine" in e.value.code
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--recipe", str(recipe), "--source", str(FIX / "OIG" / "unified_chip2.jsonl")])
    assert "--source" in e.value.code and "must be a folder" in e.value.code
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--recipe", str(tmp_path / "missing.yaml")])
    assert e.value.code == f"error: --recipe {tmp_path / 'missing.yaml'}: no such file"
    with pytest.raises(SystemExit):
        prepare(get_dataset("dolly"), ["--recipe", str(recipe)])  # one folder a set: no --recipe
    assert "unrecognized arguments: --recipe" in capsys.readouterr().err
