"""A Qwen2.5-VL model directory without weights, for ``load_format="dummy"`` runs.

vLLM fills the weights itself (seeded random values), so a directory holding
the config, a tokenizer and the processor configs is enough to run the real
engine at the real sizes with no download. The tokenizer is word-level (built
locally with ``tokenizers``) and carries Qwen's special tokens at Qwen's own ids
(151643-151656), so prompts look like Qwen prompts to vLLM's processor.

``shape="7b"`` uses Qwen2.5-VL-7B-Instruct's text and vision sizes; ``"tiny"``
is small enough for vLLM's CPU backend (tests).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
NAMED_ELSEWHERE = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_end|>",
    "<|endoftext|>",
)
"""Special tokens the tokenizer config names under another key."""
WORDS = ["user", "assistant", "system", "describe", "compare", "the", "images", "frames", "turn"]
PATCH = 14
MERGE = 2

SHAPES = {
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "mrope_section": [16, 24, 24],
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        "vocab_size": 152064,
    },
    "tiny": {
        "text": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 8192,
            "mrope_section": [8, 12, 12],
        },
        "vision": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
        },
        "vocab_size": 151680,
    },
}


#: Plain-string content: vLLM's chat front end then inserts Qwen2.5-VL's image
#: placeholders itself (what ``vllm serve`` needs for ``/v1/chat/completions``).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{{ message['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def write_word_level_tokenizer(
    path: Path,
    vocab: dict[str, int],
    special: list[str],
    chat_template: str,
    model_max_length: int,
) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of a whitespace word-level
    tokenizer with Qwen-VL's special tokens: loads in transformers and vLLM offline
    (the vLLM tests' tiny checkpoint uses it too)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": model_max_length,
                "unk_token": "[UNK]",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": chat_template,
                # Every special token named, so ``all_special_ids`` holds them all and
                # clients that sample random text from the vocabulary (sglang.bench_serving,
                # vllm bench serve) never draw a placeholder or a role marker.
                "extra_special_tokens": {
                    "image_token": "<|image_pad|>",
                    "video_token": "<|video_pad|>",
                    "vision_bos_token": "<|vision_start|>",
                    "vision_eos_token": "<|vision_end|>",
                    **{
                        token.strip("<|>") + "_token": token
                        for token in special
                        if token not in NAMED_ELSEWHERE
                    },
                },
            }
        )
    )


def _write_tokenizer(path: Path) -> None:
    vocab = {"[UNK]": 0}
    for word in WORDS + [f"w{i}" for i in range(200)]:
        vocab.setdefault(word, len(vocab))
    vocab.update(SPECIAL)
    write_word_level_tokenizer(path, vocab, list(SPECIAL), CHAT_TEMPLATE, 32768)


def _write_processors(path: Path, max_pixels: int) -> None:
    common = {
        "patch_size": PATCH,
        "merge_size": MERGE,
        "temporal_patch_size": 2,
        "min_pixels": 3136,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": 3136, "longest_edge": max_pixels},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Qwen2_5_VLProcessor",
    }
    image = {"image_processor_type": "Qwen2VLImageProcessor", **common}
    video = {"video_processor_type": "Qwen2VLVideoProcessor", **common}
    (path / "preprocessor_config.json").write_text(json.dumps(image))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2_5_VLProcessor"})
    )


def build_model_dir(path: str | Path, shape: str = "7b", max_pixels: int = 1280 * 28 * 28) -> Path:
    """Write config, tokenizer and processor configs of a Qwen2.5-VL ``shape`` to ``path``."""
    from transformers import Qwen2_5_VLConfig

    sizes = SHAPES[shape]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(path)
    _write_processors(path, max_pixels)
    text = dict(sizes["text"])
    mrope = text.pop("mrope_section")
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": sizes["vocab_size"],
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope,
            },
            "bos_token_id": SPECIAL["<|endoftext|>"],
            "eos_token_id": SPECIAL["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            **sizes["vision"],
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "window_size": 112,
            "tokens_per_second": 2,
        },
        image_token_id=SPECIAL["<|image_pad|>"],
        video_token_id=SPECIAL["<|video_pad|>"],
        vision_start_token_id=SPECIAL["<|vision_start|>"],
        vision_end_token_id=SPECIAL["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    config.save_pretrained(path)
    return path


def prompt(
    num_images: int,
    words: str = "describe the images",
    system: str = "",
    follow_ups: tuple[str, ...] = (),
    answer: str = "the images",
) -> str:
    """A raw Qwen2.5-VL chat prompt with ``num_images`` image placeholders.

    :param system: a system turn before the user's (another prefix for the same images).
    :param follow_ups: later user turns of the same conversation, each after the
        assistant's ``answer``: the first turn's prompt is then a prefix of this one.
    """
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    text = f"<|im_start|>system {system}<|im_end|> " if system else ""
    text += f"<|im_start|>user {vision} {words}<|im_end|> <|im_start|>assistant "
    for turn in follow_ups:
        text += f"{answer}<|im_end|> <|im_start|>user {turn}<|im_end|> <|im_start|>assistant "
    return text


if __name__ == "__main__":  # e.g. for `vllm serve DIR --load-format dummy` (scripts/)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    cli = parser.parse_args()
    print(build_model_dir(cli.path, cli.shape))
