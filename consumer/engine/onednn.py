"""oneDNN for the decode step's few-row matrix multiplies on CPUs (DECODE_MATMUL).

A decode step multiplies every weight matrix by one row per image in the batch. PyTorch's float32
CPU GEMM (MKL) is tuned for many rows and runs such skinny products at a fraction of its speed; the
same product through oneDNN, on the very same weight tensor, is 1.1-2.3x faster per text layer at
1-128 rows on this repository's benchmark CPU (`python -m bench.cpu_kernels`; the effect on whole
decode steps: `python -m bench.engine_cpu`; both in bench/README.md).
With hundreds of rows (prefill: every prompt and visual token at once) MKL is faster again, so the
choice is made per call by the number of rows.

Nothing is copied or repacked: the weights stay the model's own tensors, so memory is unchanged, and
the result is the same product in another summation order (differences of float32 rounding, checked
by tests/unit/engine/test_qwen.py on the generated text).
"""

from __future__ import annotations

import torch

ROWS_LIMIT = 128
"""Calls with at most this many rows go to oneDNN. On the benchmark CPU (`python -m bench.cpu_kernels`)
a Qwen3-VL-2B text layer's linear layers took, default against oneDNN: 6.5/2.9 ms at 1 row, 59/52 at
64, 97/88 at 128, 327/340 at 512, 1193/1515 at 2048; between 128 and 512 rows runs disagree on which
is faster."""


def available() -> bool:
    """Whether this PyTorch build can run a float32 linear layer through oneDNN."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(  # type: ignore[no-untyped-call]
        torch.ops.mkldnn, "_linear_pointwise"
    )


class FewRowsLinear(torch.nn.Linear):
    """An nn.Linear whose few-row calls run on oneDNN; many-row calls take nn.Linear's own path."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own name
        if input.numel() <= ROWS_LIMIT * input.shape[-1] and not torch.is_grad_enabled():
            result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(input, self.weight, self.bias, "none", [], "")
            return result
        return super().forward(input)


def route_few_rows_to_onednn(model: torch.nn.Module) -> int:
    """Make every float32 CPU nn.Linear of `model` a FewRowsLinear, in place; returns how many.

    Only the class changes: parameters, hooks and the state dict stay as they are. Subclasses of
    nn.Linear (quantized or adapter layers) are left alone, since their forward is not nn.Linear's.
    """
    converted = 0
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
        ):
            module.__class__ = FewRowsLinear
            converted += 1
    return converted
