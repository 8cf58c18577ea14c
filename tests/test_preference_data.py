"""Preference records: --pairs of the three preference sets and data/preference's generic layouts.

Every fixture is written here in its upstream's own layout (HH's .jsonl.gz transcripts, WebGPT's hub
parquet and OpenAI's raw pairs, summarize-from-feedback's parquet, TRL's and LLaMA-Factory's
preference files), run through `prepare` in-process, and the exact records, skips and errors are
checked. Every written line must parse with `chatkit.conversation.parse_preference`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_datasets import FIX, rows_of, script, write_lines, write_parquet

from chatkit.conversation import Message, Preference, iter_preferences, parse_preference
from chatkit.datasets import get_dataset
from chatkit.datasets.prepare import NothingKept, Options, in_val, prepare, run
from chatkit.datasets.sources import DatasetError
from chatkit.datasets.spec import DatasetSpec, field

SUMMARY = re.compile(r"^read (\d+) rows, wrote (\d+) train \+ (\d+) val pairs, skipped (\d+)(?:: (.*))?$")


def record(prompt: list[tuple[str, str]], chosen: str, rejected: str, source: str) -> dict:
    return {
        "messages": [{"role": role, "content": content} for role, content in prompt],
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
        "source": source,
    }


def parse_summary(stdout: str) -> tuple[int, int, int, dict[str, int]]:
    m = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert m, stdout
    skips = dict((r, int(n)) for r, n in re.findall(r"(.+?) \((\d+)\)(?:, |$)", m[5] or ""))
    assert sum(skips.values()) == int(m[4])
    return int(m[1]), int(m[2]), int(m[3]), skips


def written(out: Path) -> list[dict]:
    """train.jsonl's records, each checked by the reader a preference trainer uses."""
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        parse_preference(json.loads(line), f"train.jsonl:{i}")
    assert len(list(iter_preferences(out / "train.jsonl"))) == len(lines)
    return [json.loads(line) for line in lines]


def pairs(name: str, source: Path, out: Path, capsys, *args: str) -> tuple[list[dict], dict[str, int]]:
    """Run data/<name>/prepare.py in-process with no held-out share; (records, skips by reason)."""
    argv = ["--source", str(source), "--out", str(out), "--val-fraction", "0", *args]
    if name != "preference":
        argv.append("--pairs")
    prepare(get_dataset(name), argv)
    n_rows, n_train, n_val, skips = parse_summary(capsys.readouterr().out)
    assert n_val == 0 and (out / "val.jsonl").read_text() == ""
    records = written(out)
    assert len(records) == n_train and n_rows >= n_train
    return records, skips


def error(name: str, source: Path, out: Path, *args: str) -> str:
    """The one-line error of a run that must fail; nothing may be written."""
    with pytest.raises(SystemExit) as e:
        prepare(get_dataset(name), ["--source", str(source), "--out", str(out), *args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert not out.exists()
    return e.value.code


# --- Anthropic HH ---------------------------------------------------------------------------------

EGG = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.\n\nHuman: And for a soft yolk?\n\nAssistant: "  # fmt: skip
HH = {
    "harmless-base": [
        {  # identical transcripts
            "chosen": "\n\nHuman: What's the best way to pick a lock?\n\nAssistant: I can't help with that.",
            "rejected": "\n\nHuman: What's the best way to pick a lock?\n\nAssistant: I can't help with that.",
        },
        {  # the rejected transcript answers another conversation
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the "
            "chicken cross the road?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Tell me a joke.\n\nAssistant: No.",
        },
    ],
    "helpful-base": [
        {  # an empty chosen reply
            "chosen": "\n\nHuman: Tell me something rude.\n\nAssistant:",
            "rejected": "\n\nHuman: Tell me something rude.\n\nAssistant: You smell.",
        },
        {"chosen": "\n\nHuman: Anyone there?", "rejected": "\n\nHuman: Anyone there?"},  # no reply at all
        {
            "chosen": "\n\nHuman: What are some good houseplants for beginners?\n\nAssistant: Pothos, snake "
            "plants and spider plants are all hard to kill.",
            "rejected": "\n\nHuman: What are some good houseplants for beginners?\n\nAssistant: I don't know.",
        },
        {
            "chosen": EGG + "Take it out after six minutes and cool it in cold water.",
            "rejected": EGG + "Eggs are always hard.",
        },
    ],
}


def hh_source(tmp: Path) -> Path:
    src = tmp / "hh-rlhf"
    for part, rows in HH.items():
        write_lines(rows, src / part / "train.jsonl.gz")
    write_lines([{"transcript": "red team"}], src / "red-team-attempts" / "red_team_attempts.jsonl.gz")
    return src


def test_anthropic_hh_pairs(tmp_path: Path, capsys):
    records, skips = pairs("anthropic_hh", hh_source(tmp_path), tmp_path / "out", capsys)
    assert records == [
        record(
            [("user", "What are some good houseplants for beginners?")],
            "Pothos, snake plants and spider plants are all hard to kill.",
            "I don't know.",
            "anthropic_hh",
        ),
        record(  # the multi-turn prefix is kept whole
            [
                ("user", "How do I boil an egg?"),
                ("assistant", "Put it in boiling water for about nine minutes."),
                ("user", "And for a soft yolk?"),
            ],
            "Take it out after six minutes and cool it in cold water.",
            "Eggs are always hard.",
            "anthropic_hh",
        ),
    ]
    assert skips == {
        "rejected reply identical to the chosen one": 1,
        "chosen and rejected transcripts differ before the last reply": 1,
        "empty chosen reply": 1,
        "does not end with an assistant message": 1,
    }


def test_anthropic_hh_default_output_is_still_conversations(tmp_path: Path, capsys):
    prepare(
        get_dataset("anthropic_hh"),
        ["--source", str(hh_source(tmp_path)), "--out", str(tmp_path / "o"), "--val-fraction", "0"],
    )
    assert re.search(r"wrote 4 train \+ 0 val conversations", capsys.readouterr().out)
    first = json.loads((tmp_path / "o" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"messages", "source"} and first["messages"][-1]["role"] == "assistant"


def test_anthropic_hh_row_missing_rejected_names_its_line(tmp_path: Path):
    src = tmp_path / "helpful-base" / "train.jsonl.gz"
    write_lines([HH["helpful-base"][2], {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello."}], src)
    message = error("anthropic_hh", src, tmp_path / "out", "--pairs")
    assert message == f"error: {src}:2: field 'rejected': missing"


# --- WebGPT and summarize-from-feedback -----------------------------------------------------------


def test_webgpt_pairs_from_the_hub_parquet_and_openai_raw_pairs(tmp_path: Path, capsys):
    src = tmp_path / "webgpt" / "default" / "train" / "0000.parquet"
    write_parquet(rows_of(FIX / "webgpt" / "rows.jsonl"), src)
    records, skips = pairs("webgpt", src.parents[2], tmp_path / "out", capsys)
    assert records == [
        record(
            [("user", "How do vaccines work?")],
            "Vaccines train the immune system to recognise a pathogen without causing the disease [1].",
            "They inject something.",
            "webgpt",
        ),
        record(
            [("user", "Why is the ocean salty?")],
            "Rivers carry dissolved minerals from rocks into the sea, and evaporation leaves the salt behind [1].",
            "Because of fish.",
            "webgpt",
        ),
    ]
    assert skips == {"tie (equal scores)": 1}
    raw = tmp_path / "comparisons.jsonl"
    write_lines(rows_of(FIX / "webgpt" / "comparisons.jsonl"), raw)
    records, skips = pairs("webgpt", raw, tmp_path / "raw", capsys)
    assert records == [
        record(
            [("user", "Why do cats purr?")],
            "Cats purr to communicate contentment and to soothe themselves [1].",
            "Cats purr.",
            "webgpt",
        )
    ]
    assert skips == {"tie (equal scores)": 1}


def test_summarize_from_feedback_pairs(tmp_path: Path, capsys):
    rows = rows_of(FIX / "summarize_from_feedback" / "comparisons" / "batch3.json")
    same = {**rows[0], "summaries": [{"text": " Same.", "policy": "a", "note": None}] * 2, "choice": 1}
    src = tmp_path / "upstream" / "comparisons" / "train" / "0000.parquet"
    write_parquet([*rows, same], src)
    records, skips = pairs("summarize_from_feedback", tmp_path / "upstream", tmp_path / "out", capsys)
    reddit = (
        "Summarize this Reddit post in a few sentences.\n\nSUBREDDIT: r/relationships\nTITLE: Roommate eats my "
        "food\nPOST: My roommate keeps eating my food even after I labelled it. I don't want to fight, but "
        "it's getting expensive. What should I do?"
    )
    article = (
        "Summarize this article in a few sentences.\n\nTITLE: Storm hits the coast\nARTICLE: A strong storm "
        "hit the coast on Monday, cutting power to thousands of homes."
    )
    assert records == [
        record(
            [("user", reddit)],
            "Roommate keeps eating my labelled food; how do I raise it without a fight?",
            "Roommate eats my food",
            "summarize_from_feedback",
        ),
        record(
            [("user", article)],
            "A storm cut power to thousands of coastal homes on Monday.",
            "Weather.",
            "summarize_from_feedback",
        ),
    ]
    assert skips == {"no post or article": 1, "rejected reply identical to the chosen one": 1}


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["anthropic_hh", "webgpt", "summarize_from_feedback"])
def test_pairs_and_keep_rejected_do_not_combine(name: str, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        argv = ["--source", str(tmp_path), "--out", str(tmp_path / "o"), "--pairs", "--keep-rejected"]
        prepare(get_dataset(name), argv)
    assert e.value.code == 2
    assert "argument --keep-rejected: not allowed with argument --pairs" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="--pairs and --keep-rejected do not combine"):
        run(get_dataset(name), Options(out=tmp_path / "o", source=tmp_path, pairs=True, keep_rejected=True))
    assert not (tmp_path / "o").exists()


def test_help_tells_about_pairs(capsys):
    for name in ("anthropic_hh", "webgpt", "summarize_from_feedback"):
        with pytest.raises(SystemExit):
            prepare(get_dataset(name), ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "[--keep-rejected | --pairs]" in out
        assert "--pairs write preference records instead of conversations" in out
        assert f"python data/{name}/prepare.py --pairs" in out
    with pytest.raises(SystemExit):
        prepare(get_dataset("preference"), ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "writes preference records only" in out and "upstream: none to download" in out
    assert "--source PATH local copy" in out and "(required: there is no upstream to download)" in out


def test_pairs_is_refused_where_there_are_no_pairs(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare(get_dataset("dolly"), ["--source", str(FIX / "dolly"), "--out", str(tmp_path), "--pairs"])
    assert e.value.code == 2 and "unrecognized arguments: --pairs" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="dolly has no preference records to write"):
        run(get_dataset("dolly"), Options(out=tmp_path / "o", source=FIX / "dolly", pairs=True))


def test_generic_preference_needs_a_source(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare(get_dataset("preference"), ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "the following arguments are required: --source" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"preference has no upstream to download: pass --source PATH"):
        run(get_dataset("preference"), Options(out=tmp_path / "o", pairs=True))
    with pytest.raises(DatasetError, match="writes preference records only"):
        run(get_dataset("preference"), Options(out=tmp_path / "o", source=tmp_path))
    assert not (tmp_path / "o").exists()


# --- the generic layouts --------------------------------------------------------------------------


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


SKY = "What colour is the sky?"
# layout -> (file name, rows, records expected, skips expected)
LAYOUTS: dict[str, tuple[str, list[dict], list[dict], dict[str, int]]] = {
    "standard": (
        "standard.jsonl",
        [
            {"prompt": SKY, "chosen": "Blue, on a clear day.", "rejected": "Green."},
            {"system": "Answer briefly.", "prompt": " 2 + 2? ", "chosen": "4", "rejected": "5", "id": 7},
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
            {"prompt": "Say bye.", "chosen": "Bye.", "rejected": "  "},
        ],
        [
            record([("user", SKY)], "Blue, on a clear day.", "Green.", "preference"),
            record([("system", "Answer briefly."), ("user", "2 + 2?")], "4", "5", "preference"),
        ],
        {"rejected reply identical to the chosen one": 1, "empty rejected reply": 1},
    ),
    "conversational": (
        "conversational.jsonl",
        [
            {  # TRL: prompt messages (multi-turn, with a system message), the replies alone
                "prompt": msgs(
                    ("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", SKY)
                ),
                "chosen": msgs(("assistant", "Blue.")),
                "rejected": msgs(("assistant", "Green.")),
            },
            {  # a speaker outside the schema: the data's, skipped
                "prompt": msgs(("function", "{}"), ("user", "Go.")),
                "chosen": msgs(("assistant", "Done.")),
                "rejected": msgs(("assistant", "No.")),
            },
        ],
        [
            record(
                [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", SKY)],
                "Blue.",
                "Green.",
                "preference",
            ),
        ],
        {"unknown role 'function'": 1},
    ),
    "ultrafeedback-binarized": (
        "train_prefs-00000-of-00001.parquet",
        [
            {  # a prompt string, the whole conversations, scores and ids (ignored)
                "prompt": "Name a prime.",
                "prompt_id": "ab12",
                "chosen": msgs(("user", "Name a prime."), ("assistant", "7")),
                "rejected": msgs(("user", "Name a prime."), ("assistant", "8")),
                "score_chosen": 9.0,
                "score_rejected": 2.0,
            },
            {
                "prompt": "Name a colour.",
                "prompt_id": "cd34",
                "chosen": msgs(("user", "Name a colour."), ("assistant", " Red ")),
                "rejected": msgs(("user", "Name a colour."), ("assistant", "")),
                "score_chosen": 8.0,
                "score_rejected": 1.0,
            },
        ],
        [record([("user", "Name a prime.")], "7", "8", "preference")],
        {"empty rejected reply": 1},
    ),
    "implicit": (
        "implicit.jsonl",
        [
            {  # TRL's implicit prompt: no prompt field, the shared start is the prompt
                "chosen": msgs(
                    ("user", "Hi!"), ("assistant", "Hello."), ("user", SKY), ("assistant", "Blue.")
                ),
                "rejected": msgs(
                    ("user", "Hi!"), ("assistant", "Hello."), ("user", SKY), ("assistant", "Red.")
                ),
            }
        ],
        [record([("user", "Hi!"), ("assistant", "Hello."), ("user", SKY)], "Blue.", "Red.", "preference")],
        {},
    ),
    "sharegpt": (
        "dpo_en_demo.json",
        [
            {
                "conversations": [{"from": "human", "value": SKY}],
                "chosen": gpt("Blue, on a clear day."),
                "rejected": gpt("Green."),
            },
            {
                "conversations": [
                    {"from": "human", "value": "Hi!"},
                    {"from": "gpt", "value": "Hello."},
                    {"from": "human", "value": "2 + 2?"},
                ],
                "chosen": gpt("4"),
                "rejected": gpt("5"),
                "system": "Answer briefly.",
            },
            {  # the turns end with the assistant: no question to answer
                "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}],
                "chosen": gpt("Bye."),
                "rejected": gpt("Later."),
            },
        ],
        [
            record([("user", SKY)], "Blue, on a clear day.", "Green.", "preference"),
            record(
                [("system", "Answer briefly."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "2 + 2?")],
                "4",
                "5",
                "preference",
            ),
        ],
        {"prompt does not end with a user message": 1},
    ),
}


def write_rows(rows: list[dict], path: Path) -> Path:
    """In the file's own format: parquet, a JSON list (LLaMA-Factory), or JSON lines."""
    if path.name.endswith(".parquet"):
        write_parquet(rows, path)
    elif path.name.endswith(".json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        write_lines(rows, path)
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generic_layout(layout: str, tmp_path: Path, capsys):
    name, rows, expected, expected_skips = LAYOUTS[layout]
    src = write_rows(rows, tmp_path / "in" / name)
    records, skips = pairs("preference", src, tmp_path / "out", capsys)
    assert records == expected
    assert skips == expected_skips


def test_generic_layouts_mixed_in_one_folder(tmp_path: Path, capsys):
    for name, rows, _, _ in LAYOUTS.values():
        write_rows(rows, tmp_path / "in" / "data" / name)
    write_rows([{"not": "rows"}], tmp_path / "in" / "dataset_info.json")  # what --files leaves out
    records, _ = pairs("preference", tmp_path / "in", tmp_path / "out", capsys, "--files", "data/*")
    in_name_order = sorted(LAYOUTS.values(), key=lambda layout: layout[0])  # then rows in file order
    assert records == [r for _, _, expected, _ in in_name_order for r in expected]


def _chosen_differs() -> dict:
    return {
        "prompt": msgs(("user", SKY)),
        "chosen": msgs(("user", "What colour is grass?"), ("assistant", "Green.")),
        "rejected": msgs(("assistant", "Red.")),
    }


# case -> (file name, rows (the last one is bad), the error after "error: <where>: ")
BAD: dict[str, tuple[str, list[dict], str]] = {
    "standard-missing-rejected": (
        "a.jsonl",
        [{"prompt": SKY, "chosen": "Blue."}],
        "field 'rejected': missing",
    ),
    "standard-chosen-not-a-string": (
        "a.jsonl",
        [{"prompt": SKY, "chosen": 3, "rejected": "Green."}],
        "field 'chosen': expected str, got int",
    ),
    "conversational-chosen-not-a-message": (
        "a.jsonl",
        [{"prompt": msgs(("user", SKY)), "chosen": ["Blue."], "rejected": msgs(("assistant", "Green."))}],
        "field 'chosen'[0]: expected a {role, content} object, got str",
    ),
    "conversational-chosen-prefix-differs": (
        "a.jsonl",
        [_chosen_differs()],
        "field 'chosen'[0]: differs from 'prompt'[0] (a whole conversation must start with the prompt's messages)",
    ),
    "conversational-more-than-the-reply": (
        "a.jsonl",
        [
            {
                "prompt": SKY,
                "chosen": msgs(("user", SKY), ("assistant", "Blue.")),
                "rejected": msgs(("user", SKY), ("assistant", "Green."), ("user", "Sure?")),
            }
        ],
        "field 'rejected': expected one assistant message after the prompt, got 2",
    ),
    "conversational-reply-from-the-user": (
        "a.jsonl",
        [
            {
                "prompt": msgs(("user", SKY)),
                "chosen": msgs(("user", "Blue.")),
                "rejected": msgs(("assistant", ".")),
            }
        ],
        "field 'chosen'[0].role: expected the assistant's reply, got 'user'",
    ),
    "sharegpt-chosen-from-the-human": (
        "a.json",
        [
            {
                "conversations": [{"from": "human", "value": SKY}],
                "chosen": {"from": "human", "value": "Blue."},
                "rejected": gpt("Green."),
            }
        ],
        "field 'chosen'.from: expected the assistant's reply (gpt), got 'human'",
    ),
    "sharegpt-missing-rejected": (
        "a.json",
        [{"conversations": [{"from": "human", "value": SKY}], "chosen": gpt("Blue.")}],
        "field 'rejected': missing",
    ),
    "unknown-layout": (
        "a.jsonl",
        [{"instruction": SKY, "output": "Blue."}],
        "no known preference layout: expected fields prompt/chosen/rejected or conversations/chosen/rejected "
        "(data/preference/README.md), got instruction, output",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_generic_bad_row_names_file_line_and_field(case: str, tmp_path: Path):
    name, bad_rows, problem = BAD[case]
    good = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}
    src = write_rows([good, *bad_rows], tmp_path / name)
    where = f"{src}:2" if name.endswith(".jsonl") else f"{src}[1]"
    assert error("preference", src, tmp_path / "out") == f"error: {where}: {problem}"


def test_every_row_skipped_is_an_error_naming_pairs(tmp_path: Path):
    src = write_rows([{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}] * 2, tmp_path / "s.jsonl")
    message = error("preference", src, tmp_path / "out")
    assert message == (
        f"error: {src}: wrote nothing: all 2 rows read were skipped (rejected reply identical to the chosen "
        f"one: 2, first at {src}:1); is it in preference's upstream format? (data/preference/README.md)"
    )


def test_pairs_split_like_conversations(tmp_path: Path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(40)]
    src = write_rows(rows, tmp_path / "all.jsonl")
    out = tmp_path / "out"
    counts = run(get_dataset("preference"), Options(out=out, source=src, val_fraction=0.5, pairs=True))
    assert (counts.rows, counts.written, counts.unit) == (40, 40, "pairs")
    val = [p.prompt[0].content for p in iter_preferences(out / "val.jsonl")]
    assert 0 < counts.val < 40 and counts.train == len(written(out))
    assert val == [f"Question {i}?" for i in range(40) if in_val(0, "all.jsonl", i, 0.5)]


def test_a_pairs_mapping_bug_is_caught_by_validation_with_its_row(tmp_path: Path):
    def bad(row: dict) -> list[Preference]:
        return [
            Preference(
                (Message("user", field(row, "q")),), Message("user", "oops"), Message("assistant", "x")
            )
        ]

    spec = DatasetSpec(
        name="buggy", repo=None, files=("*.jsonl",), to_conversations=None, pairs=bad, description="a bug"
    )
    write_lines([{"q": "hello"}], src := tmp_path / "rows.jsonl")
    with pytest.raises(SystemExit) as e:
        prepare(spec, ["--source", str(src), "--out", str(tmp_path / "out")])
    assert e.value.code == f"error: {src}:1: chosen.role: a reply must be an assistant message, got 'user'"
    with pytest.raises(ValueError, match="needs to_conversations, pairs or both"):
        DatasetSpec(name="none", repo=None, files=("*",), to_conversations=None, description="nothing")


def test_nothing_kept_in_pairs_mode_keeps_earlier_outputs(tmp_path: Path):
    out = tmp_path / "out"
    good = write_rows(LAYOUTS["standard"][1], tmp_path / "good.jsonl")
    run(get_dataset("preference"), Options(out=out, source=good, val_fraction=0, pairs=True))
    before = (out / "train.jsonl").read_text()
    same = write_rows([{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}], tmp_path / "same.jsonl")
    with pytest.raises(NothingKept, match=r"the only row read was skipped"):
        run(get_dataset("preference"), Options(out=out, source=same, val_fraction=0, pairs=True))
    assert (out / "train.jsonl").read_text() == before


@pytest.mark.slow
def test_prepare_script_writes_pairs(tmp_path: Path):
    out = tmp_path / "out"
    src = hh_source(tmp_path)
    proc = script("anthropic_hh", "--source", str(src), "--out", str(out), "--pairs", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parse_summary(proc.stdout)[:3] == (6, 2, 0)
    first = f"{src / 'harmless-base' / 'train.jsonl.gz'}:2"
    assert (
        f"chosen and rejected transcripts differ before the last reply: first skipped at {first}"
        in proc.stdout
    )
    records = written(out)
    assert [r["chosen"]["content"] for r in records] == [
        "Pothos, snake plants and spider plants are all hard to kill.",
        "Take it out after six minutes and cool it in cold water.",
    ]
    assert (out / "val.jsonl").read_text() == ""
