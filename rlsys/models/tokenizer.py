"""A small byte-level BPE tokenizer trained locally on text the project generates itself.

Nothing here touches a model hub: the training corpus is produced by a fixed-seed generator that
mimics the synthetic tasks' prompts and answers (countdown, arithmetic, list reverse/sort, mazes)
wrapped in ChatML, and the BPE merges are learned from it with the ``tokenizers`` library.

Contract of the tokenizer returned by :func:`train_tokenizer`:

* Exactly Qwen2's pipeline: NFC normalizer, Qwen2's split regex, ByteLevel pre-tokenizer (no
  regex) and ByteLevel decoder. Reason: for a ``model_type: qwen2`` checkpoint, transformers 5's
  ``AutoTokenizer`` (and therefore vLLM) always instantiates ``Qwen2Tokenizer``, which rebuilds
  this pipeline from the vocab and merges whatever ``tokenizer.json`` says. Matching it keeps
  ``tokenizers.Tokenizer.from_file``, ``AutoTokenizer`` and vLLM identical (a test checks it).
* Byte-level, no UNK: ``decode(encode(s)) == unicodedata.normalize("NFC", s)`` for every string,
  so every NFC string (all ASCII, precomposed accents, CJK, emoji) round-trips exactly.
* The split regex isolates every digit (``\\p{N}`` one at a time, the same effect as
  ``Digits(individual_digits=True)``), so numbers are digit sequences and arithmetic is learnable.
* Special tokens, with fixed ids: ``<|endoftext|>`` = 0 (pad), ``<|im_start|>`` = 1,
  ``<|im_end|>`` = 2 (EOS of a chat turn). No BOS token is ever added.
* The vocabulary size is exactly :data:`VOCAB_SIZE` (a test checks the corpus is rich enough).
* Deterministic: the same library versions produce a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: the trainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
PAD_TOKEN_ID = 0
IM_START_TOKEN_ID = 1
IM_END_TOKEN_ID = 2
EOS_TOKEN = IM_END_TOKEN
EOS_TOKEN_ID = IM_END_TOKEN_ID

VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 1024
# The corpus seed is fixed (independent of any model seed) so every tiny model of a given
# format version shares one tokenizer and token ids are comparable across model seeds.
CORPUS_SEED = 20240601
CORPUS_LINES = 6000

# Qwen2's pre-tokenization regex (transformers' Qwen2Tokenizer uses the same one).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen-style ChatML. Unlike Qwen2.5-Instruct there is no default system prompt: a system
# message is rendered only when the caller gives one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_WORDS = (
    "a about above add after again all also an and answer any are as ask at be because before "
    "below between both but by can check column compute correct count digit digits divide do does "
    "down each east end enter equal equals even every exactly example expression false final find "
    "first for from give given go grid has have here how if in integer into is it its last left "
    "length letter letters list make many maze minus more most move moves multiply must next no "
    "north not number numbers odd of on once one only operation operations or order other out path "
    "plus position problem product put reach reasoning result return reverse right row rules same "
    "sequence shortest should show solution solve sort sorted south start step steps string sum "
    "target than that the then there these think this three to total true two up use using value "
    "values wall walls west what when where which while with word words write you your zero"
).split()
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful reasoner. Think step by step, then give the final answer.",
    "Put your final answer within \\boxed{}.",
    "Show your reasoning in <think> </think> tags and the answer in <answer> </answer> tags.",
)
_OPS = ("+", "-", "*", "/")


def _countdown(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(1, 100) for _ in range(rng.randint(3, 5))]
    target = rng.randint(1, 999)
    q = (
        f"Use the numbers {nums} to make {target}. You can use + - * / and each number exactly "
        f"once. Answer with an expression."
    )
    a, b, c = nums[:3]
    expr = f"({a} {rng.choice(_OPS)} {b}) {rng.choice(_OPS)} {c}"
    ans = f"<think>Try {a} {rng.choice(_OPS)} {b} first.</think> <answer>{expr}</answer>"
    return q, ans


def _arith(rng: random.Random) -> tuple[str, str]:
    terms = [str(rng.randint(0, 9999)) for _ in range(rng.randint(2, 4))]
    expr = terms[0]
    for t in terms[1:]:
        expr += f" {rng.choice(_OPS)} {t}" if rng.random() < 0.5 else f"{rng.choice(_OPS)}{t}"
    if rng.random() < 0.3:
        expr = f"({expr})"
    q = rng.choice(("Solve: {e} = ?", "Compute {e}.", "What is {e}?", "{e} ="))
    val = rng.randint(-99999, 99999)
    frac = f"{val}.{rng.randint(0, 99)}" if rng.random() < 0.2 else str(val)
    a = rng.choice((f"Answer: {frac}", f"The answer is \\boxed{{{frac}}}.", f"{expr} = {frac}"))
    return q.format(e=expr), a


def _listtask(rng: random.Random) -> tuple[str, str]:
    items = [str(rng.randint(0, 99)) for _ in range(rng.randint(3, 8))]
    if rng.random() < 0.3:
        items = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in items]
    kind = rng.choice(("reverse", "sort"))
    sep = rng.choice((", ", " ", ","))
    shown = sep.join(items)
    q = rng.choice(
        (
            f"{kind.capitalize()} the list: [{shown}]",
            f"{kind.capitalize()} the following list of numbers: {shown}",
            f"Please {kind} the list {shown} and write the result.",
        )
    )
    out = list(reversed(items)) if kind == "reverse" else sorted(items)
    return q, f"Answer: [{sep.join(out)}]"


def _maze(rng: random.Random) -> tuple[str, str]:
    w, h = rng.randint(3, 7), rng.randint(3, 6)
    rows = ["".join(rng.choice("..#") for _ in range(w)) for _ in range(h)]
    rows[0] = "S" + rows[0][1:]
    rows[-1] = rows[-1][:-1] + "E"
    grid = "\n".join(rows)
    q = f"Solve the maze. Move from S to E; # is a wall.\n{grid}\nGive the moves."
    moves = " ".join(rng.choice(("U", "D", "L", "R", "up", "down", "left", "right")) for _ in range(6))
    return q, f"Path: {moves}. Answer: \\boxed{{{moves.replace(' ', ',')}}}"


def _prose(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(5, 16)
    words = [rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    if rng.random() < 0.2:
        words = [w.upper() for w in words]
    text = " ".join(words) + rng.choice((".", "?", "!", ":", ";", ","))
    return text, " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) + "."


_GENERATORS = (_countdown, _arith, _listtask, _maze, _prose)


def iter_corpus(n_lines: int = CORPUS_LINES, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Yield ``n_lines`` deterministic training documents (one ChatML conversation each).

    The output depends only on ``(n_lines, seed)``: ``random.Random(int)`` is seeded without
    hashing, so the sequence is the same in every process and Python version.
    """
    rng = random.Random(seed)
    for _ in range(n_lines):
        question, answer = rng.choice(_GENERATORS)(rng)
        parts = []
        if rng.random() < 0.3:
            parts.append(f"{IM_START_TOKEN}system\n{rng.choice(_SYSTEM_PROMPTS)}{IM_END_TOKEN}\n")
        parts.append(f"{IM_START_TOKEN}user\n{question}{IM_END_TOKEN}\n")
        parts.append(f"{IM_START_TOKEN}assistant\n{answer}{IM_END_TOKEN}\n")
        yield "".join(parts)


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """Run the BPE trainer without rayon threads; restores the caller's setting afterwards.

    ``tokenizers`` reads ``TOKENIZERS_PARALLELISM`` on every parallel call, so a temporary
    override suffices. Word counting in threads merges hash maps in a scheduling-dependent order;
    the trainer's tie-breaking makes the result deterministic anyway (a test checks it), but one
    thread removes the question entirely, and on a corpus this small it costs nothing.
    """
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def train_raw_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train and return the raw ``tokenizers.Tokenizer`` (see the module docstring for its contract).

    Raises ``RuntimeError`` if the corpus is too small to reach ``vocab_size`` exactly, or if the
    special tokens did not get their fixed ids.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            # The regex already split the text; ByteLevel only maps bytes to printable symbols.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols are in the vocab even if the corpus never uses them: no UNK.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _single_threaded_tokenizers():
        tok.train_from_iterator(iter_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer corpus too small: trained vocab has {tok.get_vocab_size()} entries, "
            f"wanted {vocab_size}; enlarge CORPUS_LINES or lower the vocab size"
        )
    for tid, text in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(text) != tid:
            raise RuntimeError(f"special token {text!r} got id {tok.token_to_id(text)}, want {tid}")
    return tok


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the project tokenizer and wrap it for transformers.

    Returns a ``PreTrainedTokenizerFast`` (transformers 5: ``TokenizersBackend``) with
    ``eos_token`` = ``<|im_end|>``, ``pad_token`` = ``<|endoftext|>``, no BOS,
    ``model_max_length`` = 1024 and the ChatML ``chat_template``. It is saved with
    ``tokenizer_class`` "TokenizersBackend"; next to a qwen2 ``config.json``, ``AutoTokenizer``
    nevertheless loads it as ``Qwen2Tokenizer``, with the same pipeline and ids.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_raw_tokenizer(vocab_size),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN],
        model_max_length=MODEL_MAX_LENGTH,
        # Cleanup would turn " ." into "." on decode and break the exact round trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def save_tokenizer(out_dir: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the tokenizer and write it (``tokenizer.json``, ``tokenizer_config.json``, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(vocab_size).save_pretrained(str(out))
    return out
