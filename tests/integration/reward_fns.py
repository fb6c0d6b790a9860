"""User reward functions for the integration tests (loaded by "module:function" spec)."""

import time


def hang_on_marker(completion: str, answer: str) -> bool:
    """Correct when the completion mentions the answer; sleeps forever for answers marked HANG."""
    if answer == "HANG":
        while True:
            time.sleep(1)
    return answer in completion


def has_digit(completion: str, answer: str) -> bool:
    """Correct when the completion contains a digit: a random tiny model does so ~15% of the time
    in 16 tokens, so groups of 4 come out mixed often enough to give a real gradient."""
    return any(ch.isdigit() for ch in completion)


def never(completion: str, answer: str) -> bool:
    """Always wrong: every group is all-wrong, so DAPO's filter keeps nothing."""
    return False
