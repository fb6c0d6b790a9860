"""Regression rows for the ``"math"`` verifier, modelled on Math-Verify's own test suite.

Each row is (gold, completion, expected): rlsys's :func:`verify_math` must grade ``completion``
against ``gold`` as math-verify's tests expect (huggingface/Math-Verify, ``tests/test_all.py`` and
``tests/test_boxed.py``). The rows are our own, written after those cases; what differs is the
framing: math-verify searches a whole completion for any LaTeX, while rlsys first extracts the final
answer (a ``\\boxed{}`` or an "Answer:" line, see :func:`extract_final_answer`), so every completion
here states its answer in one of those two ways. Rows where rlsys deliberately grades otherwise than
math-verify say why in a comment.
"""

from __future__ import annotations

import pytest

from rlsys.records import GRADE_OK
from rlsys.rewards.verifiers import extract_final_answer, verify_math

ROWS: list[tuple[str, str, bool]] = [
    # --- Currency: an escaped \$ is a literal dollar sign, not a math delimiter (issue 12 item 6).
    ("$16386.20$", r"worth $\boxed{\$16,\!386.20}$ at the end", True),
    ("$16386.20$", r"\boxed{\$16,386.20}", True),
    ("$16386.17$", r"Rounded to the nearest cent, $\boxed{\$16386.17}$ after 5 years.", True),
    ("$16386.20$", r"\boxed{\$16386.17}", False),  # a wrong cent is still wrong
    ("5", r"Answer: $\$5$", True),
    # The next three rows: math-verify run on the raw completion finds no number after a bare "\$"
    # (there is no "$...$" around it); rlsys extracts the "Answer:" line first and reads "\$5" as
    # math-verify reads "$\$5$", which is what the issue asks for.
    ("5", r"Answer: \$5", True),
    ("5", r"Answer: **\$5.00**.", True),
    ("10455", r"Final Answer: \$10,455", True),
    # An escaped \$ in the gold answer is fine too (math-verify alone cannot parse the bare gold
    # "\$18.90"; rlsys wraps it as "$\$18.90$" first).
    (r"\$18.90", r"\boxed{18.90}", True),
    ("20", r"\boxed{\$ 20}", True),
    ("7", r"\boxed{\$ 20}", False),
    # --- Thousands separators and decimals.
    ("7425000", r"\boxed{7,425,000}", True),
    ("1000", r"\boxed{1000.0}", True),
    ("1000.99", r"\boxed{1,000.99}", True),
    ("14916", r"Therefore, $\boxed{14{,}916}$ is our answer.", True),
    ("0.4", r"\boxed{.4}", True),
    ("-5", r"\boxed{-5}", True),
    ("-5", r"\boxed{5}", False),
    # --- Fractions versus decimals.
    ("10/9", r"\boxed{\frac{10}{9}}", True),
    ("-10/9", r"\boxed{-\frac{10}{9}}", True),
    ("$1/3$", r"\boxed{\frac13}", True),
    ("$1/3$", r"\boxed{\dfrac{1}{3}}", True),
    ("$1/3$", r"\boxed{\left( \frac{1}{3} \right)}", True),
    ("$\\frac{1}{12}$", r"\boxed{0.0833333333333333}", True),
    ("$\\frac{14}{3}$", r"$f(-2)+f(-1)+f(0)=2+\frac{5}{3}+1=\boxed{\frac{14}{3}}$", True),
    ("0.5", r"\boxed{\frac{1}{3}}", False),
    # --- Percentages.
    ("$28\\%$", r"a total loss of $\boxed{28\%}$.", True),
    ("$28\\%$", r"\boxed{28}", True),
    ("$0.28$", r"\boxed{28}", False),
    ("$\\frac{28}{100}$", r"\boxed{28}", False),
    # --- Radicals, symbols, expressions.
    ("$3\\sqrt{13}$", r"$\sqrt{117} = \boxed{3\sqrt{13}}$", True),
    ("$\\sqrt{2}+\\sqrt{5}$", r"The answer is $\boxed{\sqrt 2+\sqrt 5}$", True),
    ("$\\frac{9}{4}\\pi$", r"Therefore $\boxed{\frac94\pi}$.", True),
    ("$1 \\pm \\sqrt{19}$", r"$x = \boxed{1 \pm \sqrt{19}}.$", True),
    ("$\\frac{x+2}{7}$", r"\boxed{\frac{x}{7}+\frac{2}{7}}", True),
    ("$\\tan^2(y)+1$", r"\boxed{\sec^2(y)}", True),
    ("$90^\\circ$", r"the angle between the lines is $\boxed{90^\circ}.$", True),
    ("$204_5$", r"for a quotient of $\boxed{204_5}$.", True),
    # --- Tuples, sets, intervals.
    ("$(3, \\frac{\\pi}{2})$", r"$\boxed{\left( 3, \frac{\pi}{2} \right)}.$", True),
    ("$(6,31,-1)$", r"$(p,q,r) = \boxed{(6,31,-1)}.$", True),
    ("$(1,\\frac{9}{2})$", r"\boxed{(1,4.5)}", True),
    ("$-2,1$", r"the only integer roots are $\boxed{-2,1}.$", True),
    ("$\\{1\\pm\\sqrt{5},-2\\}$", r"$\boxed{\{1\pm\sqrt{5},-2\}}.$", True),
    ("$[0,1)$", r"\boxed{[0,1)}", True),
    ("$[0,9)$", r"\boxed{[0,1)}", False),
    ("$(0,9)$", r"\boxed{[0,9)}", False),
    ("$[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0)$", r"$\boxed{[-1, -\tfrac12) \cup (-\tfrac12, 0)}$", True),
    # --- Equations and relations.
    ("$11$", r"\boxed{x=11}", True),
    ("$k=1$", r"\boxed{1}", True),
    ("$x \\leq 5$", r"\boxed{5 \geq x}", True),
    ("$x > 5$", r"\boxed{x < 5}", False),
    # --- Text answers and units.
    ("$\\text{Evelyn}$", r"Therefore, $\boxed{\text{Evelyn}}$ is our answer.", True),
    ("$125$ miles", r"The distance is $\boxed{125\textnormal{ miles}}.$", True),
    ("$15\\mbox{ cm}^2$", r"$\frac{1}{2}\times 3 \times 10 = \boxed{15\mbox{ cm}^2}.$", True),
    # --- Matrices.
    (
        r"$\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}$",
        r"The identity matrix is $\boxed{\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}}$.",
        True,
    ),
    (
        r"$\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}$",
        r"\boxed{\begin{pmatrix}1 & 2 \\ 3 & 5\end{pmatrix}}",
        False,
    ),
    # --- Several boxes: adjacent boxes at the end form one answer, as math-verify joins them.
    ("$1,2$", r"$\boxed{1}\boxed{2}$", True),
    (r"$\{1,2,3\}$", r"\boxed{1}, \boxed{2}, \boxed{3}", True),
    ("$-2, 1$", r"The integers are \boxed{-2} and \boxed{1}.", True),
    ("$-2, 1$", r"\[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", True),
    ("$2, 3$", r"$x = \boxed{2}$ or $\boxed{3}$", True),
    ("$004$", "so \\boxed{004} is the correct answer.\n\n**Final Answer**\n\\boxed{004}", True),
    ("$840$", "therefore\\boxed{840}.,but let me explain.\n\n**Final Answer**\n\\boxed{840}", True),
    # Intentional difference: math-verify joins any two boxes less than 10 characters apart, whatever
    # stands between them ("\boxed{1} ++++++ \boxed{4}" is {1, 4}); rlsys joins only across separators,
    # so here the last box wins.
    ("$1, 4$", r"\boxed{1} ++++++ \boxed{4}", False),
    # Intentional difference: math-verify also joins boxes up to 70 characters apart with a comma
    # between; rlsys reads an intermediate result followed by text as a step, not part of the answer.
    ("$2$", r"First \boxed{1}, then we add one to get \boxed{2}", True),
    ("$1, 2$", r"First \boxed{1}, then we add one to get \boxed{2}", False),
]


@pytest.mark.parametrize(("gold", "completion", "expected"), ROWS)
def test_math_verify_regression(gold: str, completion: str, expected: bool) -> None:
    reward, correct, status, detail = verify_math(completion, gold)
    assert status == GRADE_OK, detail
    assert correct is expected, (extract_final_answer(completion), detail)
    assert reward == (1.0 if expected else 0.0)
