"""Batch-invariant greedy generation: an image's text is a function of that image alone.

At-least-once delivery redelivers events, and a redelivered event lands in another batch. With left
padding and batched kernels, a row's arithmetic depends on what shares its batch: the padding shifts
where its keys sit in attention's blocks, and a matrix multiply's kernel (and with it the order it sums
in) is chosen by the number of rows. In float32 that moved logits by about 1e-6 and never the text in
the tests; in bfloat16 it moved them by up to 0.023 and changed the text. So every step here is made
independent of the batch:

- prefill runs one sequence at a time, unpadded, through the model's own forward: the vision encoder
  sees one image's patches, attention one prompt; a batch of them is the same calls in a loop
  (prefill is compute-bound, so batching it bought nothing: bench/engine_cpu.py);
- each sequence keeps its own KV cache, and a decode step's attention runs per sequence over exactly
  its filled positions: no padding, no mask;
- every other operation of a decode step runs on all sequences at once, and its matrix multiplies on
  a fixed number of rows (`RowBlocks`): short batches are padded, long ones split, so each call has a
  shape that does not depend on the batch. Normalisation and activations work per row.

The model's weights and modules are used as they are (no copies); only the decode step's order of
calls is this module's own, checked against the model's forward by tests/unit/engine/test_qwen.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from consumer.engine import onednn

logger = logging.getLogger(__name__)
Kernel = Literal["default", "onednn", "packed"]
"""default: PyTorch's own matmul on the module's weight. onednn: oneDNN on the module's weight, as it
is (float32 on CPUs: the DECODE_MATMUL kernel). packed: oneDNN on a copy of the text model's weights
reordered once into oneDNN's blocked layout, query/key/value and gate/up concatenated (one call each):
without it oneDNN reorders a plain weight on every call of more than one row (CPUs only; the copy
costs the text weights' size again in memory)."""


@dataclass(frozen=True)
class RowBlocks:
    """How many rows every matrix multiply of a decode step runs on.

    A call's rows are split into blocks of at most `max_rows`, and a block with fewer than `min_rows`
    is padded with zero rows. A kernel computes a row the same way for every row count it is called
    with between the two: that is what makes a row's result independent of its batch, and what
    `bench.cpu_kernels` checks on the 2B model's shapes. bfloat16 kernels choose their summation order
    by row count throughout (a fixed count, min_rows == max_rows); float32 on oneDNN sums one way
    from 2 rows up (measured up to 256).
    """

    min_rows: int
    max_rows: int
    kernel: Kernel = "default"

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= self.max_rows:
            raise ValueError(f"need 1 <= min_rows <= max_rows, got {self.min_rows} and {self.max_rows}")

    def describe(self) -> str:
        rows = f"{self.min_rows}" if self.min_rows == self.max_rows else f"{self.min_rows}-{self.max_rows}"
        kernel = {"default": "PyTorch default", "onednn": "oneDNN", "packed": "oneDNN, prepacked weights"}
        return f"{rows} rows per call ({kernel[self.kernel]} kernel)"


def _default_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(rows, weight, bias)


def _onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return result


def in_blocks(rows: torch.Tensor, blocks: RowBlocks, apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`apply` over (n, features) `rows` in calls of min_rows..max_rows rows; the (n, out) results."""
    count = rows.shape[0]
    results = []
    for start in range(0, count, blocks.max_rows):
        block = rows[start : start + blocks.max_rows]
        real = block.shape[0]
        if real < blocks.min_rows:
            block = torch.cat([block, block.new_zeros(blocks.min_rows - real, block.shape[1])])
        results.append(apply(block.contiguous())[:real])
    return results[0] if len(results) == 1 else torch.cat(results)


def block_linear(rows: torch.Tensor, module: torch.nn.Module, blocks: RowBlocks) -> torch.Tensor:
    """`module(rows)` for a linear layer, in row blocks (`RowBlocks`).

    A plain nn.Linear runs the blocks' kernel on its own weight tensor; any other module (a quantized or
    LoRA layer) is called as it is, on the same fixed-size blocks.
    """
    if isinstance(module, torch.nn.Linear) and type(module) in (torch.nn.Linear, onednn.FewRowsLinear):
        weight, bias = module.weight, module.bias
        onednn_kernel = blocks.kernel != "default" and weight.device.type == "cpu"
        kernel = _onednn_linear if onednn_kernel else _default_linear
        return in_blocks(rows, blocks, lambda block: kernel(block, weight, bias))
    return in_blocks(rows, blocks, module)


@dataclass
class DecodeSequence:
    """One sequence being generated: its own KV cache, filled to `length`, and its tokens so far."""

    keys: list[torch.Tensor]
    """Per text layer, (1, kv heads, capacity, head dim); positions [0, length) are filled."""
    values: list[torch.Tensor]
    length: int
    position_delta: int
    """M-RoPE: a text token's rotary position is its cache position plus this (Qwen3-VL's rope_deltas)."""
    prompt_ids: torch.Tensor
    """(prompt length,) on the model's device: what repetition penalty counts as seen."""
    tokens: list[int] = field(default_factory=list)
    finished: bool = False


class InvariantDecoder:
    """Greedy generation over a Qwen3-VL model (transformers), each sequence independent of the others."""

    def __init__(self, model: Any, blocks: RowBlocks) -> None:
        self.model = model
        self.blocks = blocks
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.text = base.model.language_model
        self.lm_head = base.lm_head
        text_config = self.text.config
        self.kv_heads: int = text_config.num_key_value_heads
        self.head_dim: int = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.heads_per_kv: int = text_config.num_attention_heads // self.kv_heads
        self._packed: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        if blocks.kernel == "packed":
            for layer in self.text.layers:
                attention, mlp = layer.self_attn, layer.mlp
                for group in (
                    (attention.q_proj, attention.k_proj, attention.v_proj),
                    (attention.o_proj,),
                    (mlp.gate_proj, mlp.up_proj),
                    (mlp.down_proj,),
                ):
                    self._pack(group)
            self._pack((self.lm_head,))

    def _pack(self, modules: tuple[torch.nn.Module, ...]) -> None:
        """Keep `modules`' weights, concatenated, in oneDNN's blocked layout (plain CPU nn.Linear only)."""
        linears = [m for m in modules if type(m) in (torch.nn.Linear, onednn.FewRowsLinear)]
        if len(linears) < len(modules) or linears[0].weight.device.type != "cpu":
            return
        weights: list[torch.Tensor] = [m.weight.detach() for m in linears if isinstance(m, torch.nn.Linear)]
        biases = [m.bias.detach() for m in linears if isinstance(m, torch.nn.Linear) and m.bias is not None]
        if biases and len(biases) < len(weights):
            return  # some with a bias, some without: left to run one by one
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        bias = torch.cat(biases) if biases else None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        except RuntimeError as exc:  # oneDNN cannot pack this dtype on this CPU: the layers run one by one
            logger.warning("decode weights left unpacked: %s", exc)
            return
        self._packed[tuple(id(m) for m in modules)] = (packed, bias, [int(w.shape[0]) for w in weights])

    def _matmuls(self, rows: torch.Tensor, *modules: torch.nn.Module) -> list[torch.Tensor]:
        """`rows` through each linear layer in `modules`, in row blocks (one call where they were packed)."""
        packed = self._packed.get(tuple(id(m) for m in modules))
        if packed is None:
            return [block_linear(rows, module, self.blocks) for module in modules]
        weight, bias, sizes = packed
        out = in_blocks(rows, self.blocks, lambda block: _onednn_linear(block, weight, bias))
        return list(torch.split(out, sizes, dim=-1)) if len(sizes) > 1 else [out]

    # -- prefill ------------------------------------------------------------------------------------
    def prefill(self, inputs: dict[str, torch.Tensor], capacity: int) -> tuple[DecodeSequence, torch.Tensor]:
        """Run one unpadded prompt (batch of one) through the model; its sequence and last-position logits.

        `capacity`: cache positions to allocate (prompt + the new tokens to come).
        """
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("prefill takes one sequence at a time")
        output = self.model(**inputs, use_cache=True, logits_to_keep=1)
        cache = output.cache
        prompt_length = inputs["input_ids"].shape[1]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in cache.layers:
            for source, target in ((layer.keys, keys), (layer.values, values)):
                buffer = source.new_empty(1, self.kv_heads, capacity, self.head_dim)
                buffer[:, :, :prompt_length] = source
                target.append(buffer)
        deltas = self.base.model.rope_deltas
        sequence = DecodeSequence(
            keys=keys,
            values=values,
            length=prompt_length,
            position_delta=int(deltas.reshape(-1)[0]) if deltas is not None else 0,
            prompt_ids=inputs["input_ids"][0],
        )
        return sequence, output.logits[0, -1].float()

    # -- decode -------------------------------------------------------------------------------------
    def step(self, sequences: Sequence[DecodeSequence], tokens: torch.Tensor) -> torch.Tensor:
        """Feed each sequence its next token (`tokens`, (n,)); the logits for the token after, (n, vocab) float32.

        Every matrix multiply runs in row blocks (`RowBlocks`), attention per sequence over its own cache.
        """
        text = self.text
        count = len(sequences)
        hidden = text.embed_tokens(tokens)
        positions = torch.tensor([s.length + s.position_delta for s in sequences], device=hidden.device)
        # M-RoPE: a generated token has the same position on its temporal, height and width axes.
        cos, sin = text.rotary_emb(hidden, positions.view(1, count, 1).expand(3, count, 1))
        cos, sin = cos.view(count, 1, 1, -1), sin.view(count, 1, 1, -1)
        for index, layer in enumerate(text.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            query, key, value = self._matmuls(normed, attention.q_proj, attention.k_proj, attention.v_proj)
            query = attention.q_norm(query.reshape(count, -1, self.head_dim))
            key = attention.k_norm(key.reshape(count, -1, self.head_dim))
            value = value.reshape(count, -1, self.head_dim)
            # (n, heads, 1, dim), rotated as the model's own attention does (rotate-half).
            query, key = _rotate(query.unsqueeze(2), cos, sin), _rotate(key.unsqueeze(2), cos, sin)
            attended = torch.empty_like(query)
            for row, sequence in enumerate(sequences):
                attended[row] = self._attend(sequence, index, query[row], key[row], value[row])
            hidden = hidden + self._matmuls(attended.view(count, -1), attention.o_proj)[0]
            normed = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            gate, up = self._matmuls(normed, mlp.gate_proj, mlp.up_proj)
            hidden = hidden + self._matmuls(mlp.act_fn(gate) * up, mlp.down_proj)[0]
        for sequence in sequences:
            sequence.length += 1
        return self._matmuls(text.norm(hidden), self.lm_head)[0].float()

    def _attend(
        self, sequence: DecodeSequence, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's attention at one layer: store its new key and value, attend over its filled cache.

        query (heads, 1, dim); key and value (kv heads, 1, dim) or (kv heads, dim). Returns (heads, 1, dim).
        """
        position = sequence.length
        keys, values = sequence.keys[layer], sequence.values[layer]
        keys[0, :, position] = key.reshape(self.kv_heads, self.head_dim)
        values[0, :, position] = value.reshape(self.kv_heads, self.head_dim)
        # Grouped-query attention inside SDPA (no repeated keys); on CPUs it beat transformers' pack_gqa for one
        # query token by about a tenth in bfloat16 (bench.cpu_kernels, attention section).
        out = F.scaled_dot_product_attention(
            query.unsqueeze(0),
            keys[:, :, : position + 1],
            values[:, :, : position + 1],
            scale=self.head_dim**-0.5,
            enable_gqa=True,
        )
        return out.reshape(-1, 1, self.head_dim)

    def trace(self, prompts: Sequence[dict[str, torch.Tensor]], steps: int) -> list[torch.Tensor]:
        """Each prompt's logits after prefill and after `steps` greedy decode steps, (steps + 1, vocab) each.

        The prompts decode together, whatever tokens they choose (EOS included): for checking that a row's
        numbers do not depend on its batch.
        """
        prefilled = [self.prefill(inputs, inputs["input_ids"].shape[1] + steps) for inputs in prompts]
        sequences = [sequence for sequence, _ in prefilled]
        logits = [torch.stack([first for _, first in prefilled])]
        for _ in range(steps):
            logits.append(self.step(sequences, logits[-1].argmax(dim=-1)))
        return list(torch.stack(logits, dim=1))

    # -- generate -----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[dict[str, torch.Tensor]],
        max_new_tokens: int,
        eos_ids: set[int],
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Greedy tokens for each prompt (one unpadded sequence each), up to and including an EOS token."""
        sequences, logits = [], []
        for inputs in prompts:
            sequence, first = self.prefill(inputs, inputs["input_ids"].shape[1] + max_new_tokens)
            sequences.append(sequence)
            logits.append(first)
        self._choose(sequences, torch.stack(logits), eos_ids, repetition_penalty, max_new_tokens)
        while active := [s for s in sequences if not s.finished]:
            tokens = torch.tensor([s.tokens[-1] for s in active], device=active[0].prompt_ids.device)
            self._choose(active, self.step(active, tokens), eos_ids, repetition_penalty, max_new_tokens)
        return [s.tokens for s in sequences]

    def _choose(
        self,
        sequences: Sequence[DecodeSequence],
        logits: torch.Tensor,
        eos_ids: set[int],
        repetition_penalty: float,
        max_new_tokens: int,
    ) -> None:
        """Greedy choice per row (after the repetition penalty): appended to its tokens; finished rows marked."""
        if repetition_penalty != 1.0:
            logits = torch.stack(
                [_penalise(row, s, repetition_penalty) for row, s in zip(logits, sequences, strict=True)]
            )
        chosen = logits.argmax(dim=-1)
        for sequence, token in zip(sequences, chosen.tolist(), strict=True):
            sequence.tokens.append(token)
            if token in eos_ids or len(sequence.tokens) >= max_new_tokens:
                sequence.finished = True


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half), as transformers' apply_rotary_pos_emb computes it."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return (states * cos) + (rotated * sin)


def _penalise(logits: torch.Tensor, sequence: DecodeSequence, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on one row: tokens seen in prompt or output."""
    seen = torch.cat([sequence.prompt_ids, torch.tensor(sequence.tokens, dtype=torch.long, device=logits.device)])
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)
