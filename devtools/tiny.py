"""A tiny random-weight Qwen3-VL checkpoint, built locally, for tests and the offline demo.

No model hub is reachable in CI, so tests load this checkpoint through exactly the code that loads
the real Qwen/Qwen3-VL-2B-Instruct (AutoModelForImageTextToText, AutoProcessor, PeftModel). It has
the real model's file layout and architecture class, with every dimension shrunk; its descriptions
are random tokens and mean nothing.

`qwen3_vl_config(REAL_2B)` gives the full 2B architecture for random-weight benchmarks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SECOND_ADAPTER = "adapter-b"
"""Where make_tiny_model writes its second adapter, inside the model's directory."""

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A small chat template in Qwen's shape: the image placeholder sits where the message puts it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TOKENIZER_CORPUS = [
    "| # | Step | Role |",
    "|---|---|---|",
    "| 1 | Start of process | System |",
    "| 2 | Review the request | Manager |",
    "| 3 | Approve or reject | Director |",
    "Describe the diagram as a markdown table of its steps and roles.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Начало процесса, согласование, утверждение, конец.",
]


@dataclass(frozen=True)
class Architecture:
    """The dimensions of a Qwen3-VL checkpoint that differ between the tiny and the real model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    tie_word_embeddings: bool
    rope_theta: float = 5_000_000.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 262_144


TINY = Architecture(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mrope_section=(4, 2, 2),
    vision_depth=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_num_heads=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=(0,),
    tie_word_embeddings=False,
    max_position_embeddings=8192,
    # Wider than the library's 0.02 so the random network's output depends on the image and the
    # adapter, instead of repeating one token: tests compare outputs, so they must differ.
    initializer_range=0.2,
)

# Qwen/Qwen3-VL-2B-Instruct, from its public config (about 2.13 B parameters).
REAL_2B = Architecture(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    mrope_section=(24, 20, 20),
    vision_depth=24,
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_num_heads=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=(5, 11, 17),
    tie_word_embeddings=True,
)

REAL_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
REAL_VOCAB_SIZE = 151_936


def qwen3_vl_config(arch: Architecture, vocab_size: int, token_ids: dict[str, int]):
    """A Qwen3VLConfig with every field explicit: the library defaults are not the 2B model."""
    from transformers import Qwen3VLConfig

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "initializer_range": arch.initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": arch.rope_theta,
            "mrope_section": list(arch.mrope_section),
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": arch.tie_word_embeddings,
        "pad_token_id": token_ids["pad_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
    }
    vision_config = {
        "depth": arch.vision_depth,
        "hidden_size": arch.vision_hidden_size,
        "intermediate_size": arch.vision_intermediate_size,
        "num_heads": arch.vision_num_heads,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": arch.hidden_size,
        "num_position_embeddings": arch.num_position_embeddings,
        "deepstack_visual_indexes": list(arch.deepstack_visual_indexes),
        "initializer_range": arch.initializer_range,
    }
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    config.eos_token_id = token_ids["eos_token_id"]
    config.pad_token_id = token_ids["pad_token_id"]
    return config


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config's token-id fields, read from a tokenizer that has Qwen's special tokens."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def make_processor(tokenizer, chat_template: str = CHAT_TEMPLATE):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=chat_template,
    )


def randomize_lora_b(peft_model, std: float) -> None:
    """Draw every lora_B weight of `peft_model` from N(0, std): peft starts them at zero, where an adapter
    changes nothing. Uses torch's global generator, in named_parameters order."""
    import torch

    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, std)


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL checkpoint to `directory`, a LoRA adapter to `directory/adapter` and a
    second, different one to `directory/adapter-b` (for ADAPTERS).

    Returns the adapter directory. The adapters' lora_B weights are non-zero, so applying one changes
    what the model generates (a freshly initialised LoRA would be a no-op).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = _train_tokenizer()
    token_ids = special_token_ids(tokenizer)
    config = qwen3_vl_config(TINY, vocab_size=len(tokenizer), token_ids=token_ids)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = token_ids["eos_token_id"]
    model.generation_config.pad_token_id = token_ids["pad_token_id"]
    model.generation_config.do_sample = False
    model.save_pretrained(directory)
    make_processor(tokenizer).save_pretrained(directory)

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, lora)
    randomize_lora_b(peft_model, 0.5)
    adapter_dir = directory / "adapter"
    peft_model.save_pretrained(adapter_dir)
    # A second fine-tune of the same shape (ADAPTERS=b=DIR/adapter-b): other lora_B weights, other texts.
    randomize_lora_b(peft_model, 0.5)
    peft_model.save_pretrained(directory / SECOND_ADAPTER)
    (directory / "TINY_MODEL.json").write_text(
        json.dumps({"note": "random weights: descriptions are meaningless", "seed": seed}) + "\n"
    )
    logger.info(
        "tiny Qwen3-VL written to %s, adapters to %s and %s", directory, adapter_dir, directory / SECOND_ADAPTER
    )
    return adapter_dir
