"""BATCH_INVARIANT: a row's numbers never depend on what shares its batch (consumer/engine/invariant.py).

Compared bit for bit (torch.equal), in float32 and bfloat16, on whatever CPU flavour runs the suite
(`python -m devtools.flavours` imitates the others) and on a GPU when one is present. The tiny model's
greedy text is compared in test_qwen.py; here the logits themselves, which move before any text does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.engine.base import EngineLoadError, GenerationRequest
from consumer.engine.invariant import RowBlocks, in_blocks
from consumer.engine.qwen import QwenVLEngine
from devtools.samples import sample_diagram
from tests.unit.engine.test_qwen import PROMPTS, SIZES, load_engine, mixed_requests

DTYPES = ["float32", "bfloat16"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")),
]
STEPS = 3  # decode steps traced after prefill

_engines: dict[tuple[Path, str, str, int | None], QwenVLEngine] = {}


def engine_for(model_dir: Path, dtype: str, device: str = "cpu", decode_rows: int | None = None) -> QwenVLEngine:
    key = (model_dir, dtype, device, decode_rows)
    if key not in _engines:
        _engines[key] = load_engine(model_dir, device=device, torch_dtype=dtype, decode_rows=decode_rows)
    return _engines[key]


def prompts_of(engine: QwenVLEngine, requests: list[GenerationRequest]) -> list[dict[str, torch.Tensor]]:
    return [engine._on_device(engine.collate([request])) for request in requests]


def traces(engine: QwenVLEngine, prompts: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    assert engine.decoder is not None
    with torch.inference_mode():
        return engine.decoder.trace(prompts, STEPS)


@pytest.fixture(scope="module")
def pool(tiny_model) -> dict[str, tuple[QwenVLEngine, list[dict[str, torch.Tensor]], list[torch.Tensor]]]:
    """Per dtype: the engine, 8 prompts (3 image sizes, 2 prompt lengths) and each one's trace alone."""
    result = {}
    for dtype in DTYPES:
        engine = engine_for(tiny_model, dtype)
        prompts = prompts_of(engine, mixed_requests(8))
        result[dtype] = (engine, prompts, [traces(engine, [prompt])[0] for prompt in prompts])
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_rows_logits_are_bit_identical_in_any_batch_and_order(pool, dtype, data):
    engine, prompts, alone = pool[dtype]
    members = data.draw(st.lists(st.integers(0, len(prompts) - 1), min_size=1, max_size=8), label="batch")
    together = traces(engine, [prompts[index] for index in members])
    for position, index in enumerate(members):
        assert torch.equal(together[position], alone[index]), (dtype, members, position)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_batch_twice_gives_the_same_logits(pool, dtype):
    engine, prompts, _ = pool[dtype]
    first, second = traces(engine, prompts), traces(engine, prompts)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batches_longer_than_a_row_block_are_split_and_still_agree(tiny_model, dtype):
    """DECODE_ROWS=3 splits 8 rows into blocks of 3, 3 and 2 (padded to 3): each row as alone."""
    engine = engine_for(tiny_model, dtype, decode_rows=3)
    assert engine.decoder is not None
    assert (engine.decoder.blocks.min_rows, engine.decoder.blocks.max_rows) == (3, 3)
    prompts = prompts_of(engine, mixed_requests(8))
    together = traces(engine, prompts)
    for prompt, row in zip(prompts, together, strict=True):
        assert torch.equal(traces(engine, [prompt])[0], row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_text_is_the_same_alone_in_any_batch_and_order(tiny_model, device, dtype):
    engine = engine_for(tiny_model, dtype, device)
    requests = mixed_requests(12)
    alone = [engine.generate([request]).generations[0].text for request in requests]
    assert len(set(alone)) >= 6, alone  # the texts depend on the input, so equality proves something
    assert [g.text for g in engine.generate(requests).generations] == alone
    reordered = requests[5:] + requests[:5]
    texts = [g.text for g in engine.generate(reordered[:7]).generations]
    texts += [g.text for g in engine.generate(reordered[7:]).generations]
    assert texts == alone[5:] + alone[:5]


def test_text_is_the_same_in_a_fresh_process(tiny_model):
    """Run to run: another process (other allocations, other memory alignment) writes the same text."""
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from tests.unit.engine.test_qwen import load_engine, mixed_requests
        texts = {{}}
        for dtype in {DTYPES!r}:
            engine = load_engine(Path({str(tiny_model)!r}), torch_dtype=dtype)
            texts[dtype] = [g.text for g in engine.generate(mixed_requests(5)).generations]
        print(json.dumps(texts))
        """
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = json.loads(done.stdout.strip().splitlines()[-1])
    for dtype in DTYPES:
        here = [g.text for g in engine_for(tiny_model, dtype).generate(mixed_requests(5)).generations]
        assert elsewhere[dtype] == here, dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_steps_compute_what_the_models_forward_computes(pool, dtype):
    """The decoder's own decode step against transformers' forward over the prompt and the chosen tokens."""
    engine, prompts, alone = pool[dtype]
    tolerance = 1e-4 if dtype == "float32" else 0.1  # bfloat16 keeps 8 bits of mantissa
    with torch.inference_mode():
        for prompt, trace in zip(prompts[:3], alone[:3], strict=True):
            chosen = trace.argmax(dim=-1)[:STEPS]
            extended = dict(prompt)
            extended["input_ids"] = torch.cat([prompt["input_ids"], chosen[None]], dim=1)
            extended["attention_mask"] = torch.ones_like(extended["input_ids"])
            extended["mm_token_type_ids"] = torch.cat(
                [prompt["mm_token_type_ids"], torch.zeros_like(chosen)[None]], dim=1
            )
            full = engine.model(**extended).logits[0, -(STEPS + 1) :].float()
            torch.testing.assert_close(trace, full, atol=tolerance, rtol=tolerance)


def test_each_image_goes_through_the_vision_encoder_alone(tiny_model):
    engine = engine_for(tiny_model, "bfloat16")
    grids: list[int] = []  # images per vision encoder call
    handle = engine.model.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: grids.append(kwargs["grid_thw"].shape[0]), with_kwargs=True
    )
    try:
        engine.generate(mixed_requests(5))
    finally:
        handle.remove()
    assert grids == [1] * 5


def test_row_blocks_pad_and_split_to_the_block_size():
    seen: list[int] = []

    def apply(block: torch.Tensor) -> torch.Tensor:
        seen.append(block.shape[0])
        return block * 2

    rows = torch.arange(14.0).view(7, 2)
    assert torch.equal(in_blocks(rows, RowBlocks(3, 3), apply), rows * 2)
    assert seen == [3, 3, 3]
    seen.clear()
    assert torch.equal(in_blocks(rows[:1], RowBlocks(2, 256), apply), rows[:1] * 2)
    assert seen == [2]
    with pytest.raises(ValueError, match="min_rows <= max_rows"):
        RowBlocks(4, 2)


def test_warm_up_checks_the_guarantee_on_this_machine(tiny_model):
    engine = load_engine(tiny_model, torch_dtype="bfloat16")
    assert engine.warm_up() > 0


def test_warm_up_refuses_a_machine_that_breaks_the_guarantee(tiny_model, monkeypatch):
    """Were a kernel to sum a row differently in a batch, the replica would not start."""
    engine = load_engine(tiny_model, torch_dtype="bfloat16")
    assert engine.decoder is not None
    real_step = engine.decoder.step

    def batch_dependent(sequences, tokens):
        logits = real_step(sequences, tokens)
        return logits + (len(sequences) - 1) * 1e-3

    monkeypatch.setattr(engine.decoder, "step", batch_dependent)
    with pytest.raises(EngineLoadError, match="BATCH_INVARIANT: on this machine a row's logits change with its batch"):
        engine.warm_up()


def test_batch_invariant_false_runs_the_padded_batch(tiny_model):
    """The setting that trades the guarantee away: transformers' generate on a left-padded batch."""
    padded = load_engine(tiny_model, batch_invariant=False)
    assert padded.decoder is None
    requests = [GenerationRequest(sample_diagram(index, SIZES[index % 3]), PROMPTS[index % 2]) for index in range(4)]
    # float32 kept its guarantee on the padded path (issue 13's tests): the same text as alone.
    alone = [padded.generate([request]).generations[0].text for request in requests]
    assert [g.text for g in padded.generate(requests).generations] == alone
