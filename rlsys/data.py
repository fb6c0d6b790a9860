"""Read prompt datasets from JSONL / Parquet files into :class:`~rlsys.records.PromptRow`, and write
them back.

Supported files (chosen by extension):

* ``.jsonl`` -- one JSON object per line; blank lines are ignored.
* ``.json`` -- JSON lines too, or a single JSON array of objects when the file starts with ``[``.
* ``.parquet`` -- one row per record; nested columns (structs, lists of structs) come back as
  dicts and lists, so verl-style files work unchanged.

A row needs a prompt and an answer, found by key. Keys may be dotted paths into nested objects
(``reward_model.ground_truth``, as verl's parquet files use); a top-level key that literally
contains a dot wins over the path. The prompt is either a string (one user message) or a list of
``{"role": ..., "content": ...}`` messages. The answer may be a string, int or float (converted
to a string; ``72.0`` becomes ``"72"``). Examples::

    load_rows("gsm8k.jsonl", prompt_key="question", answer_key="answer", answer_after="####")
    load_rows("deepscaler.jsonl", prompt_key="problem")
    load_rows("train.parquet", answer_key="reward_model.ground_truth")   # verl layout

Row ids: the ``id_key`` field when given (must be unique), otherwise ``"<file stem>/<row number>"``
with the 1-based row number in the file, so ids do not shift when bad rows are skipped.

Per-row overrides: a row's own non-empty ``verifier`` string field and its ``task`` string field
(as written by :func:`save_rows`) replace the ``verifier`` argument / the default task (the file
stem); pass
``verifier_key=None`` / ``task_key=None`` to ignore such fields. A ``meta`` object of strings is
kept as ``PromptRow.meta``.

Bad rows (unparsable JSON line, not an object, missing key, empty prompt, wrong types):
``on_bad_row="error"`` raises :class:`DataError` naming the file, the 1-based row number, what is
wrong and which setting to change; ``on_bad_row="skip"`` drops the row, counts it by reason in the
:class:`LoadReport` and logs a warning on the ``rlsys.data`` logger. A missing, empty or
all-bad file, an unknown extension and duplicate ids are always errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsys.config import ConfigError
from rlsys.fsutil import atomic_file, write_jsonl
from rlsys.records import PromptRow

logger = logging.getLogger("rlsys.data")

JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
# How many individual bad-row messages a report keeps (and the log shows) before summarizing.
MAX_REPORTED_ERRORS = 5
_ROLES = ("system", "user", "assistant", "tool")
_MISSING = object()


class DataError(ValueError):
    """A dataset file cannot be used as given; the message says where and how to fix it."""


@dataclass
class LoadReport:
    """What :func:`load_rows` read: rows kept, rows skipped (by reason) and the first errors."""

    num_rows: int = 0
    num_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)


class _BadRow(Exception):
    """One row is unusable: ``reason`` is a short counter key, ``message`` the explanation."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---- reading records ---------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object or a _BadRow) for every non-blank line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, _BadRow("bad_encoding", f"line is not valid UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, _BadRow("bad_json", f"line is not valid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid JSON array of objects ({exc})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold JSON lines or one array of objects")
    yield from enumerate(data, start=1)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a declared dependency
        raise DataError(f"{path}: reading Parquet needs pyarrow ({exc}); pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError variants for broken files
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    rownum = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            rownum += 1
            yield rownum, record


def _first_char(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head[:1].decode("latin-1")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_EXTENSIONS:
        return _iter_parquet(path)
    if suffix == ".json" and _first_char(path) == "[":
        return _iter_json_array(path)
    return _iter_jsonl(path)


# ---- turning a record into a PromptRow ---------------------------------------------------------


def _lookup(record: dict, key: str) -> Any:
    """``record[key]``, else the dotted path ``a.b.c`` through nested dicts; _MISSING if absent."""
    if key in record:
        return record[key]
    if "." not in key:
        return _MISSING
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _available_keys(record: dict) -> str:
    keys = sorted(str(k) for k in record)
    shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
    return shown or "(none)"


def _messages(value: Any, prompt_key: str, system_prompt: str | None) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow("empty_prompt", f"prompt field {prompt_key!r} is an empty string")
        messages: list[tuple[str, str]] = [("user", value)]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise _BadRow("empty_prompt", f"prompt field {prompt_key!r} is an empty list")
        messages = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise _BadRow(
                    "bad_prompt",
                    f"prompt message {i} is not an object with 'role' and 'content' (got {type(msg).__name__})",
                )
            role, content = msg["role"], msg["content"]
            if not isinstance(role, str) or role not in _ROLES:
                raise _BadRow("bad_prompt", f"prompt message {i} has role {role!r}; use one of {_ROLES}")
            if not isinstance(content, str):
                raise _BadRow(
                    "bad_prompt",
                    f"prompt message {i} has non-string content ({type(content).__name__}); "
                    f"multimodal content lists are not supported",
                )
            messages.append((role, content))
        if not any(content.strip() for _, content in messages):
            raise _BadRow("empty_prompt", f"prompt field {prompt_key!r} has only empty messages")
    else:
        raise _BadRow(
            "bad_prompt",
            f"prompt field {prompt_key!r} is a {type(value).__name__}; expected a string or a "
            f"list of {{'role', 'content'}} messages",
        )
    if system_prompt is not None and messages[0][0] != "system":
        # The file's own system message wins over the configured default.
        messages.insert(0, ("system", system_prompt))
    return tuple(messages)


def _answer_text(value: Any, answer_key: str, answer_after: str | None) -> str:
    if isinstance(value, bool) or value is None:
        raise _BadRow("bad_answer", f"answer field {answer_key!r} is {value!r}; expected str/int/float")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _BadRow("bad_answer", f"answer field {answer_key!r} is {value!r}")
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, str):
        text = value
    else:
        raise _BadRow(
            "bad_answer",
            f"answer field {answer_key!r} is a {type(value).__name__}; expected str/int/float "
            f"(point data.answer_key at a scalar field)",
        )
    if answer_after is not None:
        if answer_after not in text:
            raise _BadRow("bad_answer", f"answer field {answer_key!r} has no {answer_after!r} marker")
        text = text.rsplit(answer_after, 1)[1]
    text = text.strip()
    if not text:
        raise _BadRow("bad_answer", f"answer field {answer_key!r} is empty")
    return text


def _meta(value: Any) -> tuple[tuple[str, str], ...] | None:
    """A ``meta`` field as written by save_rows (a dict, or Parquet's map as (key, value) pairs)."""
    items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else None
    if items is None:
        return None
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            return None
        k, v = item
        if not (isinstance(k, str) and isinstance(v, str)):
            return None
        out.append((k, v))
    return tuple(out)


def _to_row(
    record: Any,
    rownum: int,
    *,
    stem: str,
    prompt_key: str,
    answer_key: str,
    id_key: str | None,
    verifier: str,
    verifier_key: str | None,
    task_key: str | None,
    system_prompt: str | None,
    answer_after: str | None,
) -> PromptRow:
    if isinstance(record, _BadRow):
        raise record
    if not isinstance(record, dict):
        raise _BadRow("not_an_object", f"row is a JSON {type(record).__name__}, not an object")
    prompt = _lookup(record, prompt_key)
    if prompt is _MISSING:
        raise _BadRow(
            "missing_prompt",
            f"no prompt field {prompt_key!r} (row keys: {_available_keys(record)}); set data.prompt_key=<field>",
        )
    answer = _lookup(record, answer_key)
    if answer is _MISSING:
        raise _BadRow(
            "missing_answer",
            f"no answer field {answer_key!r} (row keys: {_available_keys(record)}); "
            f"set data.answer_key=<field> (dotted paths like reward_model.ground_truth work)",
        )
    if id_key is None:
        prompt_id = f"{stem}/{rownum:06d}"
    else:
        raw_id = _lookup(record, id_key)
        if raw_id is _MISSING or raw_id is None or isinstance(raw_id, (bool, dict, list)):
            raise _BadRow(
                "bad_id",
                f"id field {id_key!r} is missing or not a string/number; fix the row or set "
                f"data.id_key=null to number rows by position",
            )
        prompt_id = str(raw_id)
        if not prompt_id.strip():
            raise _BadRow("bad_id", f"id field {id_key!r} is empty")
    row_verifier = verifier
    if verifier_key is not None:
        value = _lookup(record, verifier_key)
        if isinstance(value, str) and value.strip():
            row_verifier = value.strip()
    task = stem
    if task_key is not None:
        value = _lookup(record, task_key)
        if isinstance(value, str):  # "" is a valid task label (PromptRow's default)
            task = value.strip()
    meta = _meta(record.get("meta")) if "meta" in record else None
    return PromptRow(
        prompt_id=prompt_id,
        messages=_messages(prompt, prompt_key, system_prompt),
        answer=_answer_text(answer, answer_key, answer_after),
        verifier=row_verifier,
        task=task,
        meta=meta if meta is not None else (("source", f"{stem}:{rownum}"),),
    )


def load_rows(
    path: str | os.PathLike,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    id_key: str | None = None,
    verifier: str = "math",
    system_prompt: str | None = None,
    on_bad_row: str = "error",
    limit: int | None = None,
    answer_after: str | None = None,
    verifier_key: str | None = "verifier",
    task_key: str | None = "task",
) -> tuple[list[PromptRow], LoadReport]:
    """Read a JSONL / JSON / Parquet prompt file (see the module doc for the accepted layouts).

    ``limit`` stops after that many good rows. ``answer_after`` keeps only the text after the last
    occurrence of a marker (GSM8K's ``"####"``). Returns the rows in file order and a report.
    Raises :class:`DataError` for a missing / empty / unreadable file, an unknown extension, a bad
    row when ``on_bad_row="error"``, duplicate ids, or when no usable row remains.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    p = Path(path)
    if p.suffix.lower() not in JSONL_EXTENSIONS + PARQUET_EXTENSIONS:
        raise DataError(
            f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; use .jsonl, .json "
            f"(JSON lines or an array) or .parquet"
        )
    if not p.exists():
        raise DataError(f"{p}: no such file (check data.path)")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (check data.path)")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")

    report = LoadReport()
    rows: list[PromptRow] = []
    id_rows: dict[str, int] = {}
    for rownum, record in _records(p):
        try:
            row = _to_row(
                record,
                rownum,
                stem=p.stem,
                prompt_key=prompt_key,
                answer_key=answer_key,
                id_key=id_key,
                verifier=verifier,
                verifier_key=verifier_key,
                task_key=task_key,
                system_prompt=system_prompt,
                answer_after=answer_after,
            )
        except _BadRow as bad:
            message = f"{p}: row {rownum}: {bad.message}"
            if on_bad_row == "error":
                raise DataError(message + " (or set data.on_bad_row=skip to drop bad rows)") from None
            report.num_skipped += 1
            report.reasons[bad.reason] = report.reasons.get(bad.reason, 0) + 1
            if len(report.first_errors) < MAX_REPORTED_ERRORS:
                report.first_errors.append(message)
                logger.warning("skipping bad row: %s", message)
            continue
        if row.prompt_id in id_rows:
            raise DataError(
                f"{p}: row {rownum}: duplicate id {row.prompt_id!r} (first seen in row "
                f"{id_rows[row.prompt_id]}); ids from data.id_key={id_key!r} must be unique"
            )
        id_rows[row.prompt_id] = rownum
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    report.num_rows = len(rows)
    if report.num_skipped:
        logger.warning(
            "%s: skipped %d bad rows, kept %d (reasons: %s)",
            p,
            report.num_skipped,
            len(rows),
            ", ".join(f"{k}={v}" for k, v in sorted(report.reasons.items())),
        )
    if not rows:
        detail = f"; first problems: {report.first_errors}" if report.first_errors else ""
        raise DataError(f"{p}: no usable rows{detail}")
    return rows, report


# ---- writing -----------------------------------------------------------------------------------


def _record(row: PromptRow) -> dict[str, Any]:
    return {
        "prompt_id": row.prompt_id,
        "prompt": [{"role": role, "content": content} for role, content in row.messages],
        "answer": row.answer,
        "verifier": row.verifier,
        "task": row.task,
        "meta": dict(row.meta),
    }


def save_rows(rows: Iterable[PromptRow], path: str | os.PathLike) -> Path:
    """Write rows to ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet``; returns the path.

    Schema (both formats): ``prompt_id`` str, ``prompt`` list of ``{"role", "content"}``,
    ``answer`` str, ``verifier`` str, ``task`` str, ``meta`` string->string map. Read it back
    unchanged with ``load_rows(path, id_key="prompt_id")``. The file is written to a temporary
    name and renamed, so a crash never leaves a half-written dataset. Raises :class:`DataError`
    for an unsupported extension or no rows.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in JSONL_EXTENSIONS + PARQUET_EXTENSIONS:
        raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    records = [_record(r) for r in rows]
    if not records:
        raise DataError(f"{p}: no rows to save")
    if suffix not in PARQUET_EXTENSIONS:
        return write_jsonl(records, p)
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("answer", pa.string()),
            ("verifier", pa.string()),
            ("task", pa.string()),
            ("meta", pa.map_(pa.string(), pa.string())),
        ]
    )
    for rec in records:
        rec["meta"] = list(rec["meta"].items())
    with atomic_file(p) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)
    return p


# ================================ rows of a job, and prompt encoding ==================================
# The one place a job turns its config into prompt rows and prompt tokens (train, eval, SFT and
# difficulty all come here, so the four cannot drift apart).


def load_split(cfg: Any, split: str, n: int | None, seed: int) -> list[PromptRow]:
    """The prompt rows of one split of the job's data (``cfg`` an :class:`rlsys.config.RLConfig`).

    A built-in task (``data.task``): ``n`` rows of ``split`` generated with ``seed`` (a pure function
    of the three; ``n`` is required). A file (``data.path``): a file is one split, so ``split`` and
    ``seed`` do not apply; its first ``n`` good rows, read with the ``data.*`` keys (``None``: every
    row); malformed rows follow ``data.on_bad_row`` and skipped ones are logged.
    ``data.limit`` is not applied here (see :func:`load_train_rows`).
    """
    d = cfg.data
    if d.task is not None:
        from rlsys.tasks import get_task

        if n is None:
            raise ValueError(f"load_split: a built-in task ({d.task}) needs a row count for split {split!r}")
        return with_system_prompt(get_task(d.task).generate(split, n, seed=seed), d.system_prompt)
    rows, report = load_rows(
        d.path,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        id_key=d.id_key,
        verifier=d.verifier,
        system_prompt=d.system_prompt,
        on_bad_row=d.on_bad_row,
        answer_after=d.answer_after,
        limit=n,
    )
    if report.num_skipped:
        logger.warning("data: skipped %d malformed rows of %s: %s", report.num_skipped, d.path, report.reasons)
    return rows


def load_train_rows(cfg: Any) -> list[PromptRow]:
    """The training prompts: ``data.num_train`` generated rows of a built-in task's train split (seed
    ``trainer.seed``), or every row of ``data.path``; then the first ``data.limit`` of them."""
    d = cfg.data
    rows = load_split(cfg, "train", d.num_train if d.task is not None else None, cfg.trainer.seed)
    return rows[: d.limit] if d.limit else rows


def load_eval_rows(cfg: Any) -> list[PromptRow]:
    """The evaluation problems: a built-in task's ``eval.split`` (``eval.num_prompts`` rows generated
    with ``eval.seed``), or the first ``eval.num_prompts`` rows of ``data.path``."""
    e = cfg.eval
    return load_split(cfg, e.split, e.num_prompts, e.seed)


def load_pool_rows(cfg: Any) -> list[PromptRow]:
    """The prompts :mod:`rlsys.difficulty` estimates: a built-in task's train split
    (``difficulty.pool_size`` rows generated with ``trainer.seed``, the same rows and ids the training
    run's prompt set starts with), or the training rows of ``data.path`` (``data.limit`` applies)."""
    if cfg.data.task is not None:
        return load_split(cfg, "train", cfg.difficulty.pool_size, cfg.trainer.seed)
    return load_train_rows(cfg)


def with_system_prompt(rows: list[PromptRow], system_prompt: str | None) -> list[PromptRow]:
    """``rows`` with ``system_prompt`` as their first message, except rows that already start with a
    system message of their own (those win); ``None`` returns ``rows`` unchanged."""
    if system_prompt is None:
        return rows
    return [
        r
        if r.messages and r.messages[0][0] == "system"
        else dataclasses.replace(r, messages=(("system", system_prompt), *r.messages))
        for r in rows
    ]


@dataclass(frozen=True)
class PromptFormat:
    """How a row's messages become the token ids the policy sees (``data.prompt_format`` and friends).

    ``style="chat"``: the tokenizer's chat template with the assistant generation prompt, given
    ``template_kwargs`` as extra template variables (Qwen3's ``enable_thinking``); encoded without
    adding special tokens, because the template writes its own (BOS included where it has one).
    ``style="plain"``: for checkpoints without a chat template (base models): the messages' texts joined
    by blank lines, put where ``{}`` stands in ``input_template``; encoded with the tokenizer's special
    tokens (its BOS, where it adds one), as a base model saw text in pre-training.
    """

    style: str = "chat"
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs
    input_template: str = "{}"

    @classmethod
    def from_config(cls, data_cfg: Any) -> PromptFormat:
        """The format ``data_cfg`` (an :class:`rlsys.config.DataConfig`, already validated) asks for."""
        kwargs = dict(data_cfg.chat_template_kwargs or {})
        return cls(data_cfg.prompt_format, tuple(sorted(kwargs.items())), data_cfg.input_template)


def render_prompt(tokenizer: Any, row: PromptRow, fmt: PromptFormat) -> str:
    """The prompt text of ``row`` in format ``fmt``, before tokenization.

    Raises :class:`rlsys.config.ConfigError` when the chat format meets a tokenizer without a chat
    template, naming ``data.prompt_format=plain`` as the way to train such a checkpoint.
    """
    if fmt.style == "plain":
        return fmt.input_template.replace("{}", "\n\n".join(content for _, content in row.messages), 1)
    if fmt.style != "chat":
        raise ValueError(f"unknown prompt format {fmt.style!r}; choose chat or plain")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"invalid config data.prompt_format='chat': the tokenizer of {tokenizer.name_or_path!r} has no "
            "chat_template; set data.prompt_format=plain (optionally data.input_template='Question: {}\\nAnswer:') "
            "for a base model, or add a chat_template (tokenizer_config.json or chat_template.jinja)"
        )
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in row.messages],
        tokenize=False,
        add_generation_prompt=True,
        **dict(fmt.template_kwargs),
    )


def encode_prompt(tokenizer: Any, row: PromptRow, fmt: PromptFormat) -> list[int]:
    """Render ``row`` in format ``fmt`` (:func:`render_prompt`) and tokenize it once."""
    return tokenizer.encode(render_prompt(tokenizer, row, fmt), add_special_tokens=fmt.style == "plain")


def probe_tokens(tokenizer: Any, row: PromptRow, fmt: PromptFormat) -> list[int]:
    """A fixed sequence (a prompt plus a short answer) both sides score after every sync."""
    return encode_prompt(tokenizer, row, fmt) + tokenizer.encode("Answer: 42", add_special_tokens=False)
