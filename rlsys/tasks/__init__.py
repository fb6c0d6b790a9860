"""Built-in procedurally generated tasks, by name.

``get_task("countdown")`` (several correct answers per prompt, rare-correct modes) and
``get_task("sort")`` (exactly one correct answer, the control), ``get_task("pyfunc")`` (write a
Python function; graded by running it against tests in the code sandbox), ``get_task("gsm_symbolic")``
and ``get_task("arithmetic")`` (reasoning-gym generators, :mod:`rlsys.tasks.rgym`) return
:class:`~rlsys.tasks.base.Task` objects with ``generate(split, n, seed)``, ``verify``,
``canonical_answer``, ``solutions`` and ``reference_solution``. Each row's ``verifier`` is a
``"module:function"`` spec (``"rlsys.tasks.countdown:verify"``) so the reward pool can grade
without this registry.
"""

from __future__ import annotations

from rlsys.tasks.base import SPLITS, Task
from rlsys.tasks.countdown import CountdownSpec, CountdownTask
from rlsys.tasks.pyfunc import PyFuncTask
from rlsys.tasks.rgym import ARITHMETIC, GSM_SYMBOLIC, GymTask
from rlsys.tasks.sort import SortSpec, SortTask

TASKS: dict[str, Task] = {
    "countdown": CountdownTask(),
    "sort": SortTask(),
    "pyfunc": PyFuncTask(),  # code execution: model-written Python run against tests in the sandbox
    "gsm_symbolic": GymTask(GSM_SYMBOLIC),  # reasoning-gym: GSM8K-derived word problems, integer answers
    "arithmetic": GymTask(ARITHMETIC),  # reasoning-gym basic_arithmetic: + - * / expressions
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))} "
            f"(or set data.task=null and data.path=<file.jsonl|.parquet>)"
        ) from None


__all__ = [
    "SPLITS",
    "TASKS",
    "CountdownSpec",
    "CountdownTask",
    "SortSpec",
    "SortTask",
    "Task",
    "get_task",
]
