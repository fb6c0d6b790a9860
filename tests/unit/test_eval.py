"""Pure parts of rlsys.eval and rlsys.difficulty: pass@k tables, output files, plots, the sampling and
grading loop over fake pools (chunking, order, seeds, distinct answers), and difficulty selection."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rlsys.algo import pass_at_k, pass_at_k_curve
from rlsys.data import PromptFormat
from rlsys.difficulty import (
    annotated_record,
    difficulty_summary,
    format_summary,
    load_pass_rates,
    num_to_select,
    pass_rate_histogram,
    plot_pass_rate_histogram,
    select_by_difficulty,
    write_jsonl,
)
from rlsys.eval import (
    SampleGrades,
    check_ks,
    default_prompts_per_call,
    eval_metrics,
    eval_seed,
    evaluate,
    format_table,
    pass_at_k_table,
    plot_pass_at_k,
    result_from_grades,
    safe_label,
    sample_and_grade,
    write_eval_outputs,
)
from rlsys.records import GRADE_OK, GRADE_TIMEOUT, Completion, Grade, PromptRow, RolloutGroup
from rlsys.tasks import get_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ================================ pass@k tables =======================================================


def test_pass_at_k_table_known_values():
    mean, se = pass_at_k_table([4, 4], [0, 4], [1, 4])
    assert mean == {1: 0.5, 4: 0.5}
    # per-problem pass@k is [0, 1]: std(ddof=1) = sqrt(0.5), divided by sqrt(2) -> 0.5
    assert se[1] == pytest.approx(0.5) and se[4] == pytest.approx(0.5)
    mean, _ = pass_at_k_table([4], [1], [1, 2, 4])
    assert mean[1] == pytest.approx(0.25)
    assert mean[2] == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert mean[4] == 1.0


def test_pass_at_k_table_matches_curve_and_is_monotone():
    rng = np.random.default_rng(0)
    n = np.full(50, 64)
    c = rng.binomial(64, rng.uniform(0, 0.3, size=50))
    ks = [1, 2, 4, 8, 16, 32, 64]
    mean, se = pass_at_k_table(n, c, ks)
    assert list(mean) == ks
    assert mean == pytest.approx(pass_at_k_curve(n, c, ks))
    vals = [mean[k] for k in ks]
    assert all(0 <= v <= 1 for v in vals) and vals == sorted(vals)
    for k in ks:
        per = pass_at_k(n, c, k)
        assert se[k] == pytest.approx(np.std(per, ddof=1) / math.sqrt(50))


def test_pass_at_k_table_single_problem_stderr_is_nan():
    _, se = pass_at_k_table([8], [3], [1, 8])
    assert math.isnan(se[1]) and math.isnan(se[8])


@pytest.mark.parametrize(
    "n, c, ks", [([], [], [1]), ([4], [1], []), ([4], [1], [5]), ([4, 4], [1], [1]), ([4], [5], [1])]
)
def test_pass_at_k_table_rejects_bad_input(n, c, ks):
    with pytest.raises(ValueError):
        pass_at_k_table(n, c, ks)


def test_check_ks():
    assert check_ks([16, 1, 4, 4], 16) == (1, 4, 16)
    for bad in ([], [0], [17], [True], [1.5]):
        with pytest.raises(ValueError):
            check_ks(bad, 16)


# ================================ results and files ===================================================


def grades_fixture(c_per_prompt=(0, 2, 4), n=4, distinct=(0, 1, 2)) -> SampleGrades:
    p = len(c_per_prompt)
    correct = np.zeros((p, n), dtype=bool)
    for i, ci in enumerate(c_per_prompt):
        correct[i, :ci] = True
    return SampleGrades(
        prompt_ids=tuple(f"t/{i}" for i in range(p)),
        correct=correct,
        rewards=correct.astype(np.float32),
        lengths=np.full((p, n), 10, dtype=np.int32),
        truncated=np.zeros((p, n), dtype=bool),
        status_counts={"ok": p * n - 1, "timeout": 1, "error": 0, "invalid": 0},
        distinct_correct=None if distinct is None else np.asarray(distinct, dtype=np.int64),
        generate_seconds=1.0,
        grade_seconds=0.5,
    )


def test_result_from_grades():
    res = result_from_grades(grades_fixture(), (1, 2, 4), seed=3)
    assert res.n.tolist() == [4, 4, 4] and res.c.tolist() == [0, 2, 4]
    assert res.pass_at_k[1] == pytest.approx(0.5)
    assert res.pass_at_k[4] == pytest.approx(2 / 3)
    assert res.num_timeouts == 1 and res.num_errors == 0
    assert res.mean_distinct_correct == pytest.approx(1.0)
    assert res.mean_response_length == 10.0 and res.seed == 3
    m = eval_metrics(res)
    assert m["eval/pass@1"] == res.pass_at_k[1] and "eval/pass@4_stderr" in m
    assert m["eval/distinct_correct"] == 1.0 and m["eval/reward_timeouts"] == 1
    table = format_table(res, "title")
    assert table.splitlines()[0] == "title"
    assert "0.5000" in table and "distinct correct" in table and "timeouts 1" in table


def test_write_eval_outputs(tmp_path):
    res = result_from_grades(grades_fixture(), (1, 2, 4), seed=0)
    paths = write_eval_outputs(res, tmp_path / "out", "step 20/final", config={"eval": {"n": 4}})
    assert paths.json.name == "step_20_final.json"
    data = json.loads(paths.json.read_text())
    assert data["label"] == "step 20/final" and data["config"] == {"eval": {"n": 4}}
    r = data["result"]
    assert r["pass_at_k"]["1"] == pytest.approx(0.5) and r["ks"] == [1, 2, 4]
    assert [(p["n"], p["c"], p["distinct_correct"]) for p in r["problems"]] == [(4, 0, 0), (4, 2, 1), (4, 4, 2)]
    # pass@k in the JSON is consistent with its own per-problem (n, c)
    n = [p["n"] for p in r["problems"]]
    c = [p["c"] for p in r["problems"]]
    for k in r["ks"]:
        assert r["pass_at_k"][str(k)] == pytest.approx(float(np.mean(pass_at_k(n, c, k))))
    with open(paths.csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(x["k"]) for x in rows] == [1, 2, 4]
    assert float(rows[0]["pass_at_k"]) == pytest.approx(0.5)
    assert float(rows[0]["stderr"]) == pytest.approx(res.pass_at_k_stderr[1], abs=1e-6)
    assert paths.png.read_bytes()[:8] == PNG_MAGIC


def test_write_eval_outputs_single_problem_has_no_stderr(tmp_path):
    res = result_from_grades(grades_fixture((1,), distinct=None), (1, 4), seed=0)
    paths = write_eval_outputs(res, tmp_path, "one")
    data = json.loads(paths.json.read_text())  # strict JSON: NaN would not parse as null
    assert data["result"]["pass_at_k_stderr"] == {"1": None, "4": None}
    assert data["result"]["mean_distinct_correct"] is None and "distinct_correct" not in data["result"]["problems"][0]
    with open(paths.csv) as fh:
        assert [row["stderr"] for row in csv.DictReader(fh)] == ["", ""]
    assert "-" in format_table(res).splitlines()[1]


def test_plot_pass_at_k_several_curves(tmp_path):
    curves = {"base": {1: 0.2, 4: 0.4, 16: 0.6}, "f_grpo": {1: 0.25, 4: 0.5, 16: 0.7, 64: 0.8}}
    errors = {"base": {1: 0.01, 4: float("nan"), 16: 0.02}}
    path = plot_pass_at_k(curves, tmp_path / "sub" / "cmp.png", errors=errors, title="study")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_pass_at_k({}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_pass_at_k({"empty": {}}, tmp_path / "x.png")


def test_safe_label():
    assert safe_label("qwen2-tiny-seed0-v1") == "qwen2-tiny-seed0-v1"
    assert safe_label("a/b c") == "a_b_c"
    assert safe_label("///") == "eval"


# ================================ sample_and_grade over fake pools ====================================


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "|".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens):
        return [len(text) % 97, 1, 2]


class FakeRollout:
    """Answers each prompt with completions[prompt_id] (cycled to n); records calls and seeds."""

    num_workers = 2

    def __init__(self, completions: dict[str, list[str]]):
        self.completions = completions
        self.calls: list[tuple[list[str], dict[str, int]]] = []

    def generate(self, requests, group_size, seeds):
        self.calls.append(([r.prompt_id for r in requests], dict(seeds)))
        groups = []
        for r in requests:
            texts = self.completions[r.prompt_id]
            comps = tuple(
                Completion(
                    token_ids=np.arange(j % 3 + 1, dtype=np.int32),
                    logprobs=np.zeros(j % 3 + 1, dtype=np.float32),
                    text=texts[j % len(texts)],
                    finish_reason="length" if j % 3 == 2 else "stop",
                )
                for j in range(group_size)
            )
            groups.append(RolloutGroup(r.prompt_id, r.prompt_token_ids, comps, 0, 0))
        return groups, []


class FakeRewards:
    """Grades in process with the row's built-in task verifier; "HANG" completions time out."""

    def __init__(self):
        self.validated: list[str] = []

    def validate_specs(self, specs):
        self.validated.extend(specs)

    def grade(self, requests):
        out = []
        for r in requests:
            if r.completion == "HANG":
                out.append(Grade(r.prompt_id, r.sample_index, 0.0, False, GRADE_TIMEOUT))
                continue
            ok = get_task("countdown").verify(r.completion, r.answer)
            out.append(Grade(r.prompt_id, r.sample_index, float(ok), ok, GRADE_OK))
        return out


def countdown_setup():
    task = get_task("countdown")
    rows = task.generate("test", 5, seed=0)
    comps = {}
    for i, row in enumerate(rows):
        sols = task.solutions(row)
        # prompt i: i distinct correct answers (when it has that many), plus wrong and timed-out samples
        comps[row.prompt_id] = [f"Answer: {s}" for s in sols[:i]] + ["Answer: 1+1", "HANG"]
    return rows, comps


def test_sample_and_grade_chunks_orders_and_counts():
    rows, comps = countdown_setup()
    rollout, rewards = FakeRollout(comps), FakeRewards()
    sg = sample_and_grade(
        rows, FakeTokenizer(), rollout, rewards, fmt=PromptFormat(), n=6, seed=7, max_prompts_per_call=2
    )
    assert [ids for ids, _ in rollout.calls] == [
        [r.prompt_id for r in rows[:2]],
        [r.prompt_id for r in rows[2:4]],
        [rows[4].prompt_id],
    ]
    assert rewards.validated == ["rlsys.tasks.countdown:verify"]
    assert sg.prompt_ids == tuple(r.prompt_id for r in rows)
    assert sg.correct.shape == (5, 6)
    for i, row in enumerate(rows):
        texts = comps[row.prompt_id]
        expect = [get_task("countdown").verify(texts[j % len(texts)], row.answer) for j in range(6)]
        assert sg.correct[i].tolist() == expect
        n_sols = min(i, len(get_task("countdown").solutions(row)))
        assert sg.distinct_correct[i] == n_sols
    assert sg.status_counts["timeout"] == sum(
        sum(comps[r.prompt_id][j % len(comps[r.prompt_id])] == "HANG" for j in range(6)) for r in rows
    )
    assert sg.status_counts["ok"] + sg.status_counts["timeout"] == 30
    assert sg.lengths[0].tolist() == [1, 2, 3, 1, 2, 3]
    assert sg.truncated[0].tolist() == [False, False, True, False, False, True]
    assert np.array_equal(sg.pass_rate, sg.correct.mean(axis=1))
    # Seeds depend on (seed, prompt id) only: the same for any chunking.
    seeds = {pid: s for _, call in rollout.calls for pid, s in call.items()}
    assert seeds == {r.prompt_id: eval_seed(7, r.prompt_id) for r in rows}
    other = FakeRollout(comps)
    sample_and_grade(rows, FakeTokenizer(), other, FakeRewards(), fmt=PromptFormat(), n=6, seed=7)
    assert len(other.calls) == 1 and other.calls[0][1] == seeds


def test_evaluate_over_fake_pools():
    rows, comps = countdown_setup()
    res = evaluate(
        rows,
        FakeTokenizer(),
        FakeRollout(comps),
        FakeRewards(),
        fmt=PromptFormat(),
        n=8,
        ks=[8, 1, 2],
        seed=0,
        max_prompts_per_call=3,
    )
    assert res.ks == (1, 2, 8)
    assert res.pass_at_k[1] <= res.pass_at_k[2] <= res.pass_at_k[8] <= 1
    assert res.pass_at_k[8] == pytest.approx(0.8)  # prompt 0 never has a correct sample
    assert res.distinct_correct.tolist()[0] == 0 and res.num_timeouts > 0


def test_sample_and_grade_user_verifier_has_no_distinct_counts():
    rows = [PromptRow("f/1", (("user", "hi"),), "x", "tests.integration.eval_fns:has_digit", task="f")]

    class DigitRewards(FakeRewards):
        def grade(self, requests):
            return [Grade(r.prompt_id, r.sample_index, 1.0, True) for r in requests]

    sg = sample_and_grade(
        rows, FakeTokenizer(), FakeRollout({"f/1": ["7"]}), DigitRewards(), fmt=PromptFormat(), n=2, seed=0
    )
    assert sg.distinct_correct is None and sg.correct.all()


def test_sample_and_grade_rejects_bad_input():
    rows, comps = countdown_setup()
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        sample_and_grade(
            rows + rows[:1], FakeTokenizer(), FakeRollout(comps), FakeRewards(), fmt=PromptFormat(), n=2, seed=0
        )
    with pytest.raises(ValueError, match="no prompts"):
        sample_and_grade([], FakeTokenizer(), FakeRollout(comps), FakeRewards(), fmt=PromptFormat(), n=2, seed=0)
    with pytest.raises(ValueError, match="k <= n"):
        evaluate(rows, FakeTokenizer(), FakeRollout(comps), FakeRewards(), fmt=PromptFormat(), n=2, ks=[1, 4], seed=0)


def test_default_prompts_per_call():
    assert default_prompts_per_call(256, 1) == 16
    assert default_prompts_per_call(256, 2) == 32
    assert default_prompts_per_call(100_000, 1) == 1


# ================================ difficulty selection ================================================


@pytest.mark.parametrize(
    "p, fraction, expect",
    [
        (10, 0.1, 1),
        (30, 0.1, 3),
        (10, 0.15, 2),
        (10, 0.25, 3),
        (10, 0.24, 2),
        (10, 0.001, 1),
        (7, 1.0, 7),
        (1, 0.1, 1),
        (512, 0.1, 51),
        (3, 0.5, 2),
    ],
)
def test_num_to_select_rounds_half_up_and_selects_at_least_one(p, fraction, expect):
    assert num_to_select(p, fraction) == expect


@pytest.mark.parametrize("p, fraction", [(0, 0.1), (5, 0.0), (5, 1.5), (5, -0.1)])
def test_num_to_select_rejects(p, fraction):
    with pytest.raises(ValueError):
        num_to_select(p, fraction)


def test_select_hardest_and_easiest():
    rates = [0.5, 0.1, 0.9, 0.0, 0.3, 1.0, 0.7, 0.2, 0.4, 0.6]
    assert select_by_difficulty(rates, "hardest", 0.3, seed=0).tolist() == [3, 1, 7]
    assert select_by_difficulty(rates, "easiest", 0.2, seed=0).tolist() == [5, 2]
    assert select_by_difficulty(rates, "hardest", 1.0, seed=0).tolist() == list(np.argsort(rates))
    out = select_by_difficulty(rates, "hardest", 0.01, seed=0)
    assert out.dtype == np.int64 and out.tolist() == [3]  # at least one


def test_select_ties_broken_by_seeded_shuffle():
    rates = np.array([0.0] * 10 + [0.5] * 10)
    picks = [tuple(select_by_difficulty(rates, "hardest", 0.2, seed=s)) for s in range(20)]
    assert all(len(p) == 4 and all(i < 10 for i in p) for p in picks)  # only the tied hardest ones
    assert picks[0] == tuple(select_by_difficulty(rates, "hardest", 0.2, seed=0))  # deterministic
    assert len(set(picks)) > 1  # the seed decides among ties, not the position
    # no position is systematically favoured among ties
    counts = Counter(i for s in range(200) for i in select_by_difficulty(rates, "hardest", 0.2, seed=s))
    assert set(counts) == set(range(10)) and max(counts.values()) < 3 * min(counts.values())
    easy = select_by_difficulty(rates, "easiest", 0.5, seed=1)
    assert sorted(easy.tolist()) == list(range(10, 20))


def test_select_random():
    rates = np.linspace(0, 1, 50)
    a = select_by_difficulty(rates, "random", 0.1, seed=3)
    assert len(a) == 5 and len(set(a.tolist())) == 5
    assert a.tolist() == select_by_difficulty(rates, "random", 0.1, seed=3).tolist()
    assert a.tolist() != select_by_difficulty(rates, "random", 0.1, seed=4).tolist()


@pytest.mark.parametrize(
    "rates, select, fraction",
    [
        ([], "hardest", 0.1),
        ([[0.1]], "hardest", 0.1),
        ([0.1, float("nan")], "hardest", 0.1),
        ([0.1, 1.2], "hardest", 0.1),
        ([0.1], "median", 0.1),
        ([0.1], "hardest", 0.0),
    ],
)
def test_select_rejects(rates, select, fraction):
    with pytest.raises(ValueError):
        select_by_difficulty(rates, select, fraction, seed=0)


def test_histogram_and_summary(tmp_path):
    c = np.array([0, 0, 0, 1, 5, 10, 10, 3])
    assert pass_rate_histogram(c, 10) == [3, 1, 0, 1, 0, 1, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError):
        pass_rate_histogram([11], 10)
    sel = select_by_difficulty(c / 10, "hardest", 0.25, seed=0)
    s = difficulty_summary(c, 10, sel)
    assert s["num_prompts"] == 8 and s["num_selected"] == 2
    assert s["learnable_fraction"] == pytest.approx(3 / 8)
    assert s["all_wrong_fraction"] == pytest.approx(3 / 8) and s["all_correct_fraction"] == pytest.approx(2 / 8)
    assert s["selected_pass_rate"] == {"min": 0.0, "max": 0.0, "mean": 0.0}
    assert s["histogram"]["prompts"][0] == 3 and len(s["histogram"]["pass_rate"]) == 11
    text = format_summary(s, "hardest", "t")
    assert "learnable (0 < rate < 1) 0.375" in text and "selected 2 hardest" in text
    png = plot_pass_rate_histogram(s["histogram"]["prompts"], 10, tmp_path / "h.png", title="t")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_annotated_rows_load_back(tmp_path):
    from rlsys.data import load_rows

    rows = get_task("countdown").generate("train", 3, seed=0)
    recs = [annotated_record(r, c, 10) for r, c in zip(rows, [0, 3, 10])]
    path = write_jsonl(recs, tmp_path / "annotated.jsonl")
    back, report = load_rows(path, id_key="prompt_id")
    assert report.num_skipped == 0
    assert [r.prompt_id for r in back] == [r.prompt_id for r in rows]
    assert [(r.messages, r.answer, r.verifier, r.task) for r in back] == [
        (r.messages, r.answer, r.verifier, r.task) for r in rows
    ]
    assert [dict(r.meta)["pass_rate"] for r in back] == ["0.0", "0.3", "1.0"]
    assert dict(back[0].meta)["key"] == dict(rows[0].meta)["key"]  # original meta kept
    assert load_pass_rates(path) == {rows[0].prompt_id: 0.0, rows[1].prompt_id: 0.3, rows[2].prompt_id: 1.0}


# ================================ evaluation inside a training run (cfg.eval honoured) ================


class FakeLogger:
    def __init__(self):
        self.images: list[tuple[str, str, int]] = []
        self.pass_at_k: list[tuple[str, int, dict]] = []

    def log_image(self, key, path, step):
        self.images.append((key, path, step))

    def log_pass_at_k(self, label, step, pass_at_k):
        self.pass_at_k.append((label, step, dict(pass_at_k)))


def _train_cfg(tmp_path, **eval_values):
    import dataclasses

    from rlsys.config import RLConfig

    cfg = RLConfig()
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, output_dir=str(tmp_path / "run")),
        eval=dataclasses.replace(cfg.eval, n=6, k=[1, 2], **eval_values),
    )


def test_in_training_evaluation_honours_eval_output_dir_and_max_prompts_per_call(tmp_path):
    from rlsys.eval import plot_training_evals, run_evaluation

    rows, comps = countdown_setup()
    cfg = _train_cfg(tmp_path, output_dir=str(tmp_path / "elsewhere"), max_prompts_per_call=2, seed=3)
    rollout, logger = FakeRollout(comps), FakeLogger()
    result = run_evaluation(cfg, rows, FakeTokenizer(), rollout, FakeRewards(), logger, 4, "step_000004")
    assert [len(ids) for ids, _ in rollout.calls] == [2, 2, 1]  # eval.max_prompts_per_call
    assert rollout.calls[0][1][rows[0].prompt_id] == eval_seed(3, rows[0].prompt_id)  # eval.seed
    assert result.ks == (1, 2)
    out = tmp_path / "elsewhere"
    assert sorted(p.name for p in out.iterdir()) == ["step_000004.csv", "step_000004.json", "step_000004.png"]
    assert logger.images == [("eval/plot_step_000004", str(out / "step_000004.png"), 4)]
    assert logger.pass_at_k == [("step_000004", 4, result.pass_at_k)]  # W&B: the table and line plot
    assert not (tmp_path / "run" / "eval").exists()
    plot = plot_training_evals(cfg, {"start": result, "end": result}, len(rows))
    assert plot == str(out / "pass_at_k_start_vs_end.png") and Path(plot).is_file()


def test_in_training_evaluation_defaults_to_the_run_dir_and_says_which_keys_it_cannot_honour(tmp_path, caplog):
    import logging

    from rlsys.eval import run_evaluation

    rows, comps = countdown_setup()
    cfg = _train_cfg(tmp_path, temperature=0.25, max_tokens=7)
    with caplog.at_level(logging.WARNING, logger="rlsys.eval"):
        run_evaluation(cfg, rows, FakeTokenizer(), FakeRollout(comps), FakeRewards(), FakeLogger(), 0, "start")
    assert (tmp_path / "run" / "eval" / "start.json").is_file()
    assert "eval.temperature=0.25 / eval.max_tokens=7 apply to python -m rlsys.eval only" in caplog.text


def test_eval_rows_and_pool_rows_come_from_the_one_loader(tmp_path):
    import dataclasses

    from rlsys import data
    from rlsys.config import RLConfig
    from rlsys.difficulty import load_pool_rows
    from rlsys.eval import load_eval_rows

    cfg = RLConfig()
    cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, num_prompts=3, seed=2, split="ood"),
        difficulty=dataclasses.replace(cfg.difficulty, pool_size=4),
    )
    assert load_eval_rows is data.load_eval_rows and load_pool_rows is data.load_pool_rows
    assert load_eval_rows(cfg) == get_task("countdown").generate("ood", 3, seed=2)
    assert load_pool_rows(cfg) == get_task("countdown").generate("train", 4, seed=cfg.trainer.seed)
    assert (
        data.load_train_rows(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_train=9, limit=5)))
        == get_task("countdown").generate("train", 9, seed=cfg.trainer.seed)[:5]
    )
