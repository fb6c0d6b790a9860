"""Prompt sampler: epochs without replacement, deterministic, resumable from its cursor."""

from rlsys.sampler import PromptSampler, sample_seed


def test_epochs_cover_every_row_once():
    s = PromptSampler(10, seed=3)
    first = s.take(4) + s.take(6)
    assert sorted(first) == list(range(10))
    second = s.take(10)
    assert sorted(second) == list(range(10)) and second != first


def test_resume_from_state_continues_the_same_stream():
    a = PromptSampler(7, seed=1)
    a.take(5)
    b = PromptSampler(7, seed=1, state=a.state())
    assert a.take(12) == b.take(12)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, 3, "p/1") == sample_seed(0, 3, "p/1")
    assert len({sample_seed(0, s, f"p/{i}") for s in range(5) for i in range(50)}) == 250
    assert 0 <= sample_seed(9, 9, "x") < 2**31
