"""The model families users bring, through the whole path (issue 12 item 4; docs/models.md has the table).

For each family of :mod:`rlsys.models.families` (a tiny random model of the real architecture class,
built from its config), a real one-step job runs as a user starts it: vLLM (CPU) loads the checkpoint,
the reward pool grades, the learner trains a step, the weights sync to the engine and the probe check
passes, and the HF export is written. Each family runs under one ZeRO stage (``STAGES``: both stages
over tied and untied families; under ZeRO-3 the parameters are partitioned and gathered layer by layer
for the sync). Qwen2, the default family, runs twice: ZeRO-2 on the built checkpoint, then ZeRO-3 on
that export (vLLM and the learner start from what rlsys wrote).

The last export then loads in transformers as the same architecture, tied or not as built, and its
weights moved. The Llama row is a base model without a chat template, run with
``data.prompt_format=plain``, an input template and a system prompt; the log shows the prompt as the
model saw it. About 35 s per job on a 2-core AVX-512 machine, ~70 s on AVX2 (8 jobs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.models.families import FAMILIES, build_family_model
from tests.integration.test_train import digit_data, run_train

pytestmark = pytest.mark.integration

ONE_STEP = [
    "trainer.total_steps=1",
    "trainer.eval_at_start_end=false",
    "logger=disabled",
    "learner.lr=1e-3",
]
# The ZeRO stage(s) each family's job(s) run under; a second stage runs on the first job's export.
STAGES = {
    "qwen2": (2, 3),
    "llama": (3,),
    "qwen3": (2,),
    "mistral": (2,),
    "gemma2": (3,),
    "gemma3": (2,),
    "phi3": (3,),
}
# A base model: no chat template; the plain format, with a system prompt as its first paragraph.
PLAIN = ["data.prompt_format=plain", "data.input_template='Question: {}\nAnswer:'", "data.system_prompt='Be exact.'"]


def one_step_job(tmp_path: Path, model_path: Path, zero_stage: int, extra: list[str]) -> tuple[dict, str, Path]:
    tmp_path.mkdir(parents=True)
    res, bad = run_train(
        tmp_path,
        f"model.path={model_path}",
        f"learner.zero_stage={zero_stage}",
        *digit_data(tmp_path),
        *ONE_STEP,
        *extra,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    assert not bad, f"sockets bound off loopback: {sorted(set(bad))}"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [row] = [r for r in rows if r["step"] == 1]
    # The engine scores the probe like the learner after the push: the sync carried every weight the
    # architecture has (a missed tensor, a wrong name mapping or an unapplied soft-cap shows here).
    print(f"[{model_path.name}] zero{zero_stage}: sync/logprob_diff {row['sync/logprob_diff']:.4f}")
    assert row["sync/logprob_diff"] < 0.05, row["sync/logprob_diff"]
    assert row["weight_version"] == 1 and row["train/grad_norm"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    assert (ckpt / "model.safetensors").is_file()
    return row, res.stdout, ckpt


def test_every_family_has_its_stages():
    assert set(STAGES) == set(FAMILIES)
    stages = {(FAMILIES[f].tied, z) for f, zs in STAGES.items() for z in zs}
    assert stages == {(t, z) for t in (True, False) for z in (2, 3)}  # both stages, tied and untied


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_syncs_and_exports(family, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = FAMILIES[family]
    base = family == "llama"
    built = build_family_model(tmp_path / "model", family, chat=not base)
    extra = PLAIN if base else []

    source, logs = built, []
    for zero in STAGES[family]:
        _, log, export = one_step_job(tmp_path / f"zero{zero}", source, zero, extra)
        assert f"model {source}" in log  # the engine and the learners ran on the checkpoint given
        logs.append(log)
        source = export
    final = source
    if base:
        for log in logs:
            assert "data.prompt_format=plain):\nQuestion: Be exact.\n\nWrite a number near" in log
    else:
        assert "data.prompt_format=chat):\n<|im_start|>user\nWrite a number near" in logs[0]

    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert type(model).__name__ == fam.architecture
    assert model.config.tie_word_embeddings == fam.tied
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == fam.tied
    assert bool(AutoTokenizer.from_pretrained(final).chat_template) == (not base)
    start, end = load_file(str(built / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert set(end) == set(start)  # the same tensors as the checkpoint the user brought (tied once)
    moved = [k for k in start if not torch.equal(start[k].float(), end[k].float())]
    assert len(moved) >= len(start) // 2, f"only {len(moved)}/{len(start)} tensors changed"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 17]])).logits
    assert torch.isfinite(logits).all()
