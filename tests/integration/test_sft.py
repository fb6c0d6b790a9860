"""SFT warm start on real DeepSpeed learner actors (CPU, gloo) in a local loopback-only Ray cluster.

* ``test_nll_step_has_the_nll_gradient``: the trick rlsys.sft relies on -- a GRPO train_step with
  advantage 1 on every row is an NLL step -- checked against plain PyTorch: same gradient norm as
  ``mean NLL`` (float32, grad clip off), ratio exactly 1, no clipping, and the learner's
  ``rollout_logprob_diff`` equals the batch NLL (rollout log-probs 0).
* ``test_warm_start_trains_evaluates_and_reuses``: a very short SFT lowers the held-out NLL by a
  real margin, writes a loadable Hugging Face directory with a report (vLLM evaluation included),
  and a second ``warm_start`` with the same config returns the same directory without training.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from rlsys.cluster import actor_options, connect, loopback_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster():
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_path() -> str:
    from rlsys.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("tiny", seed=0))


def _sft_batch(model_path: str, n: int = 6):
    """A countdown SFT batch exactly as rlsys.sft builds it."""
    from transformers import AutoTokenizer

    from rlsys.data import PromptFormat, encode_prompt
    from rlsys.sft import SFTBatches, _nll_batch
    from rlsys.tasks import get_task

    tok = AutoTokenizer.from_pretrained(model_path)
    task = get_task("countdown")
    rows = task.generate("train", n, seed=0)
    stream = SFTBatches(
        task, rows, [encode_prompt(tok, r, PromptFormat()) for r in rows], tok, tok.eos_token_id, n, 0, 32
    )
    return _nll_batch(*stream.next_batch(), tok.pad_token_id)


def test_nll_step_has_the_nll_gradient(ray_cluster, model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlsys.workers.learner import LearnerGroup, LearnerSpec

    batch = _sft_batch(model_path)
    # Reference: mean NLL per response token, plain PyTorch, float32.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.from_numpy(batch.input_ids)
    mask = torch.from_numpy(batch.response_mask)
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask)).logits.float()
    lp = torch.nn.functional.pad(torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    nll = -(lp * mask).sum() / mask.sum()
    nll.backward()
    ref_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))

    spec = LearnerSpec(
        model_path=model_path,
        zero_stage=2,
        dtype="float32",
        lr=1e-3,
        grad_clip=0.0,
        micro_batch_size=4,
        loss_type="grpo",
        agg="token_mean",
    )  # 6 rows: 2 micro-batches
    group = LearnerGroup(spec, 1, actor_options(1), init_dir=str(tmp_path))
    try:
        st = group.train_step(group.shard(batch, 0))
    finally:
        group.shutdown()
    assert st.ratio_max == pytest.approx(1.0, abs=1e-6) and st.ratio_min == pytest.approx(1.0, abs=1e-6)
    assert st.clip_fraction == 0.0
    assert st.rollout_logprob_diff == pytest.approx(float(nll.detach()), rel=1e-5)  # the free training-NLL metric
    assert st.loss == pytest.approx(-1.0, abs=1e-6)  # -mean(ratio * A) with ratio 1, A 1
    assert st.grad_norm == pytest.approx(ref_norm, rel=1e-4)


def test_warm_start_trains_evaluates_and_reuses(ray_cluster, model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlsys import sft
    from rlsys.config import RLConfig

    cfg = RLConfig()
    out = tmp_path / "sft"
    cfg.sft.output_dir = str(out)
    cfg.sft.steps = 15
    cfg.sft.batch_size = 16
    cfg.sft.micro_batch_size = 16
    cfg.sft.num_examples = 64
    cfg.sft.lr = 3e-3
    cfg.sft.warmup_steps = 2
    cfg.sft.log_every = 5
    cfg.sft.eval_prompts = 4
    cfg.sft.eval_samples = 4

    t0 = time.perf_counter()
    path = sft.warm_start(cfg)
    first_seconds = time.perf_counter() - t0
    assert path == str(out)
    rep = json.loads((out / sft.REPORT_FILE).read_text())
    assert rep["steps"] == 15 and rep["skipped_steps"] == 0 and rep["max_ratio_deviation"] < 1e-3
    assert rep["num_learners"] == 2  # sft.num_workers unset, CPU learners, 2 CPUs: both train
    assert [p["step"] for p in rep["nll_curve"]] == [0, 5, 10, 15]
    for split in ("train", "test"):
        before, after = rep["initial_heldout_nll"][split], rep["final_heldout_nll"][split]
        assert after < 0.8 * before, f"held-out {split} NLL {before:.3f} -> {after:.3f}: less than a 20% decrease"
    for split in ("test", "ood"):
        ev = rep["eval"][split]
        assert ev["num_prompts"] == 4 and ev["samples_per_prompt"] == 4
        assert 0.0 <= ev["pass@1"] <= ev["pass@4"] <= 1.0
        assert ev["solutions_mean"] >= 2  # countdown prompts have several solutions
    assert not list(tmp_path.glob(".sft.staging-*"))  # no temp dir left behind

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()

    # Same config again: the same directory, no training (the report is not rewritten).
    mtime = (out / sft.REPORT_FILE).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert sft.warm_start(cfg) == path
    assert time.perf_counter() - t0 < min(5.0, first_seconds / 4)
    assert (out / sft.REPORT_FILE).stat().st_mtime_ns == mtime
    assert np.isfinite(rep["train_seconds"])
