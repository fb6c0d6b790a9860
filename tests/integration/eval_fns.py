"""User reward functions for the eval/difficulty integration tests (loaded by "module:function" spec)."""


def has_digit(completion: str, answer: str) -> bool:
    """Correct when the completion contains a digit: a randomly initialised tiny model does so in a
    fraction of its samples, so pass@k grows with k and pass rates spread over (0, 1)."""
    return any(ch.isdigit() for ch in completion)
