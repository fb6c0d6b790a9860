"""Prompts as users have them: system prompts, chat-template variables, a plain format for checkpoints
without a chat template, and the prompt logged once as the model sees it (rlsys.data.PromptFormat)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlsys.config import ConfigError, RLConfig, register_configs, to_dataclass, validate
from rlsys.data import PromptFormat, encode_prompt, load_eval_rows, load_train_rows, probe_tokens, render_prompt
from rlsys.driver import log_prompt_once
from rlsys.models.tokenizer import PAD_TOKEN_ID, train_tokenizer
from rlsys.records import PromptRow

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()

ROW = PromptRow("t/1", (("system", "Be brief."), ("user", "What is 2+2?")), "4", "math")
# A Qwen3-style template: with enable_thinking=false it pre-fills an empty think block.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make(*overrides: str) -> RLConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_dataclass(compose("config", overrides=["run.output_dir=/tmp/x", *overrides]))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture()
def plain_tok(tok):
    """The same tokenizer as a base model ships it: no chat template, a BOS added to every encode."""
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t.chat_template = None
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", PAD_TOKEN_ID)]
    )
    return t


def test_chat_format_renders_the_template_with_the_generation_prompt(tok):
    text = render_prompt(tok, ROW, PromptFormat())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_prompt(tok, ROW, PromptFormat()) == tok.encode(text, add_special_tokens=False)


def test_chat_template_kwargs_reach_the_template(tok):
    t = copy.deepcopy(tok)
    t.chat_template = THINKING_TEMPLATE
    off = PromptFormat(template_kwargs=(("enable_thinking", False),))
    assert render_prompt(t, ROW, off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(t, ROW, PromptFormat()).endswith("<|im_start|>assistant\n")
    assert encode_prompt(t, ROW, off) != encode_prompt(t, ROW, PromptFormat())


def test_plain_format_joins_the_messages_into_the_input_template_with_the_tokenizers_bos(plain_tok):
    fmt = PromptFormat(style="plain", input_template="Question: {}\nAnswer:")
    assert render_prompt(plain_tok, ROW, fmt) == "Question: Be brief.\n\nWhat is 2+2?\nAnswer:"
    ids = encode_prompt(plain_tok, ROW, fmt)
    assert ids[0] == PAD_TOKEN_ID and ids.count(PAD_TOKEN_ID) == 1  # one BOS, from the tokenizer itself
    assert ids[1:] == plain_tok.encode("Question: Be brief.\n\nWhat is 2+2?\nAnswer:", add_special_tokens=False)
    # The probe appends its answer without a second BOS.
    probe = probe_tokens(plain_tok, ROW, fmt)
    assert probe[: len(ids)] == ids and probe.count(PAD_TOKEN_ID) == 1
    # A prompt holding braces is placed verbatim (no str.format).
    braces = PromptRow("t/2", (("user", "Solve {x}: {}"),), "1", "math")
    assert render_prompt(plain_tok, braces, fmt) == "Question: Solve {x}: {}\nAnswer:"


def test_chat_format_without_a_template_names_the_plain_option(plain_tok):
    with pytest.raises(ConfigError, match=r"data\.prompt_format=plain"):
        encode_prompt(plain_tok, ROW, PromptFormat())


def test_the_config_builds_the_format_and_refuses_contradictions():
    # A real newline, as bash's $'Q: {}\nA:' or a YAML "Q: {}\nA:" passes it.
    cfg = make("data.prompt_format=plain", "data.input_template='Q: {}\nA:'")
    validate(cfg)
    assert PromptFormat.from_config(cfg.data) == PromptFormat("plain", (), "Q: {}\nA:")
    cfg = make("+data.chat_template_kwargs.enable_thinking=false")
    validate(cfg)
    assert PromptFormat.from_config(cfg.data).template_kwargs == (("enable_thinking", False),)
    for overrides, key in [
        (["data.prompt_format=markdown"], r"data\.prompt_format"),
        (["data.prompt_format=plain", "data.input_template=Q:"], r"data\.input_template.*exactly one \{\}"),
        (["data.input_template='Q: {}'"], r"data\.input_template.*plain only"),
        (["data.prompt_format=plain", "+data.chat_template_kwargs.enable_thinking=false"], r"chat_template_kwargs"),
        (["+data.chat_template_kwargs.tools=[1,2]"], r"data\.chat_template_kwargs\.tools"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(make(*overrides))


def test_system_prompt_reaches_built_in_task_rows_for_training_and_eval():
    cfg = make("data.system_prompt='Think step by step.'", "data.num_train=4", "eval.num_prompts=3")
    plain = make("data.num_train=4", "eval.num_prompts=3")
    for with_sys, without in [
        (load_train_rows(cfg), load_train_rows(plain)),
        (load_eval_rows(cfg), load_eval_rows(plain)),
    ]:
        assert [r.prompt_id for r in with_sys] == [r.prompt_id for r in without]  # same problems
        assert all(r.messages == (("system", "Think step by step."), *w.messages) for r, w in zip(with_sys, without))


def test_the_prompt_is_logged_once_as_the_model_sees_it(tok, caplog):
    ids = tuple(encode_prompt(tok, ROW, PromptFormat()))
    with caplog.at_level(logging.INFO, logger="rlsys.driver"):
        log_prompt_once(tok, ROW, ids, PromptFormat())
    [record] = [r for r in caplog.records if "as the model sees it" in r.getMessage()]
    msg = record.getMessage()
    assert "t/1" in msg and f"{len(ids)} tokens" in msg and "data.prompt_format=chat" in msg
    # Special tokens are kept: a wrong template or a doubled BOS shows.
    assert msg.endswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
