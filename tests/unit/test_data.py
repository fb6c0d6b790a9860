"""Dataset files: JSONL / JSON / Parquet loading, bad rows, nested keys, save/load round trip."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsys.data import DataError, LoadReport, load_rows, save_rows
from rlsys.records import PromptRow
from rlsys.tasks import get_task


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def test_jsonl_string_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "What is 2+3?", "answer": 5},
            {"question": "Half of 3?", "answer": 1.5},
            {"question": "Ten?", "answer": 10.0},
        ],
    )
    rows, report = load_rows(path, prompt_key="question")
    assert report == LoadReport(num_rows=3, num_skipped=0, reasons={}, first_errors=[])
    assert rows[0] == PromptRow(
        prompt_id="gsm/000001",
        messages=(("user", "What is 2+3?"),),
        answer="5",
        verifier="math",
        task="gsm",
        meta=(("source", "gsm:1"),),
    )
    assert [r.answer for r in rows] == ["5", "1.5", "10"]


def test_messages_prompts_and_system_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": [{"role": "user", "content": "hi"}], "answer": "a"},
            {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}], "answer": "b"},
        ],
    )
    rows, _ = load_rows(path, system_prompt="Be brief.", verifier="exact")
    assert rows[0].messages == (("system", "Be brief."), ("user", "hi"))
    assert rows[1].messages == (("system", "own"), ("user", "q"))  # the file's system wins
    assert all(r.verifier == "exact" for r in rows)


def test_nested_keys_and_verl_parquet(tmp_path):
    path = tmp_path / "verl.parquet"
    table = pa.Table.from_pylist(
        [
            {
                "data_source": "deepscaler",
                "prompt": [{"role": "user", "content": f"Problem {i}"}],
                "reward_model": {"ground_truth": str(i * 7), "style": "rule"},
                "extra_info": {"index": i},
            }
            for i in range(5)
        ]
    )
    pq.write_table(table, path)
    rows, report = load_rows(path, answer_key="reward_model.ground_truth", id_key="extra_info.index")
    assert report.num_rows == 5
    assert [r.answer for r in rows] == ["0", "7", "14", "21", "28"]
    assert [r.prompt_id for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[3].messages == (("user", "Problem 3"),)
    rows, _ = load_rows(path, answer_key="reward_model.ground_truth", limit=2)
    assert len(rows) == 2


def test_literal_dotted_key_wins(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "a.b": "literal", "a": {"b": "nested"}}])
    rows, _ = load_rows(path, answer_key="a.b")
    assert rows[0].answer == "literal"


def test_json_array_and_gsm8k_answer_marker(tmp_path):
    path = tmp_path / "gsm8k.json"
    path.write_text(
        json.dumps([{"question": "q1", "answer": "3 + 4 = 7\n#### 7"}, {"question": "q2", "answer": "so #### 1,000 "}])
    )
    rows, _ = load_rows(path, prompt_key="question", answer_after="####")
    assert [r.answer for r in rows] == ["7", "1,000"]
    with pytest.raises(DataError, match="row 1: .*no '@@' marker"):
        load_rows(path, prompt_key="question", answer_after="@@")


def test_bad_json_line_errors_with_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "1"}, "{not json", ""])
    with pytest.raises(DataError) as info:
        load_rows(path)
    msg = str(info.value)
    assert "bad.jsonl" in msg and "row 2" in msg and "not valid JSON" in msg and "on_bad_row=skip" in msg
    assert isinstance(info.value, ValueError)


def test_missing_key_names_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"m\.jsonl: row 1: no prompt field 'prompt' .*question.*data\.prompt_key"):
        load_rows(path)
    with pytest.raises(DataError, match=r"row 1: no answer field 'solution'.*data\.answer_key"):
        load_rows(path, prompt_key="question", answer_key="solution")


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "ok 1", "answer": "1"},
            "{broken",
            {"answer": "2"},
            {"prompt": "", "answer": "3"},
            {"prompt": [{"role": "user", "content": ["img"]}], "answer": "4"},
            "[1, 2]",
            {"prompt": "ok 2", "answer": None},
            {"prompt": "ok 3", "answer": "3"},
            {"prompt": [{"role": "robot", "content": "x"}], "answer": "4"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="rlsys.data"):
        rows, report = load_rows(path, on_bad_row="skip")
    assert [r.prompt_id for r in rows] == ["mixed/000001", "mixed/000008"]  # ids keep file rows
    assert report.num_rows == 2 and report.num_skipped == 7
    assert report.reasons == {
        "bad_json": 1,
        "missing_prompt": 1,
        "empty_prompt": 1,
        "bad_prompt": 2,
        "not_an_object": 1,
        "bad_answer": 1,
    }
    assert len(report.first_errors) == 5 and "row 2" in report.first_errors[0]
    assert "skipped 7 bad rows" in caplog.text and "mixed.jsonl: row 2" in caplog.text


def test_blank_lines_and_bad_utf8(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n\n  \n\xff\xfe\n{"prompt": "b", "answer": "2"}\n')
    rows, report = load_rows(path, on_bad_row="skip")
    assert [r.prompt_id for r in rows] == ["u/000001", "u/000005"]
    assert report.reasons == {"bad_encoding": 1}


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(tmp_path / "blank.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_rows(tmp_path / "data.csv")
    write_jsonl(tmp_path / "allbad.jsonl", ["{x", "{y"])
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(tmp_path / "allbad.jsonl", on_bad_row="skip")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_rows(tmp_path / "broken.parquet")
    with pytest.raises(DataError, match="on_bad_row"):
        load_rows(tmp_path / "allbad.jsonl", on_bad_row="ignore")


def test_duplicate_ids_error(tmp_path):
    path = write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"id": 1, "prompt": "a", "answer": "1"},
            {"id": 2, "prompt": "b", "answer": "2"},
            {"id": 1, "prompt": "c", "answer": "3"},
        ],
    )
    with pytest.raises(DataError, match=r"row 3: duplicate id '1' \(first seen in row 1\)"):
        load_rows(path, id_key="id", on_bad_row="skip")


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_save_load_round_trip(tmp_path, ext):
    task = get_task("countdown")
    rows = task.generate("train", 20, seed=0) + get_task("sort").generate("test", 5, seed=0)
    rows.append(PromptRow("plain/1", (("system", "s"), ("user", "u")), "42", "math"))
    path = save_rows(rows, tmp_path / "sub" / f"export.{ext}")
    loaded, report = load_rows(path, id_key="prompt_id")
    assert loaded == rows
    assert report.num_rows == len(rows)
    assert not list((tmp_path / "sub").glob(".*tmp"))  # the temporary file is gone
    with pytest.raises(DataError, match="no rows"):
        save_rows([], tmp_path / "x.jsonl")
