"""A tiny random Qwen2-VL checkpoint, built offline for the vLLM tests.

Nothing is downloaded: the config is written by hand, the tokenizer is a
WordLevel vocabulary built with the ``tokenizers`` library (plus Qwen2-VL's
special tokens), the processor configs are the image/video processors'
defaults with a small pixel range, and the weights are random.

Shapes are chosen for vLLM's CPU backend: its attention needs ``head_dim >=
32`` (text hidden 128 with 2 heads = 64), the vision tower's ``hidden_size``
(its merger's output) must equal the text hidden size, and ``mrope_section``
must add up to ``head_dim / 2``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitbatch.bench.qwen_vl_model import write_word_level_tokenizer

PATCH = 14
MERGE = 2
PIXELS_PER_TOKEN = (PATCH * MERGE) ** 2  # 28 x 28 px per merged image token
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = [f"w{i}" for i in range(240)]
HIDDEN = 128
TEXT_HEADS = 2
HEAD_DIM = HIDDEN // TEXT_HEADS


def _vocab() -> dict[str, int]:
    vocab = {"[UNK]": 0}
    for token in (
        WORDS + ["user", "assistant", "system", "describe", "compare", "the", "images"] + SPECIAL
    ):
        vocab.setdefault(token, len(vocab))
    return vocab


def _write_tokenizer(path: Path, vocab: dict[str, int]) -> None:
    # Content may be a list of parts: the e2e test sends chat messages with images.
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }} "
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'text' %} {{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    write_word_level_tokenizer(path, vocab, SPECIAL, chat_template, 4096)


def _config(vocab: dict[str, int]) -> dict:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen2_vl_text",
            "vocab_size": len(vocab),
            "hidden_size": HIDDEN,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            # A wide init keeps the random model's logits well separated, so
            # greedy decoding is not decided by rounding noise.
            "initializer_range": 0.3,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [8, 12, 12],
            },
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "initializer_range": 0.3,
        },
    }


def _processor_configs(max_tokens_per_image: int) -> tuple[dict, dict]:
    pixels = {
        "min_pixels": PIXELS_PER_TOKEN * 4,
        "max_pixels": PIXELS_PER_TOKEN * max_tokens_per_image,
    }
    common = {
        "patch_size": PATCH,
        "merge_size": MERGE,
        "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Qwen2VLProcessor",
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        **pixels,
        "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        **common,
    }
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        **pixels,
        "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        **common,
    }
    return image, video


def build_tiny_qwen2vl(path: str | Path, *, seed: int = 0, max_tokens_per_image: int = 64) -> Path:
    """Write a complete tiny Qwen2-VL checkpoint (config, tokenizer, processors, weights) to
    ``path``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    config_dict = _config(vocab)
    _write_tokenizer(path, vocab)
    image, video = _processor_configs(max_tokens_per_image)
    (path / "preprocessor_config.json").write_text(json.dumps(image))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))

    config = Qwen2VLConfig(
        **{k: v for k, v in config_dict.items() if k not in ("architectures", "torch_dtype")}
    )
    config.architectures = config_dict["architectures"]
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # random but spread-out weights (see initializer_range above)
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(
                    torch.randn(parameter.shape, generator=generator)
                    * (0.3 if "visual" not in name else 0.1)
                )
    model.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrites config.json; keep the hand-written one (token ids, dtype).
    (path / "config.json").write_text(json.dumps(config_dict, indent=1))
    return path


def image_tokens(width: int, height: int) -> int:
    """Merged image tokens for an image whose sides are multiples of 28 px and within the
    pixel range."""
    return (width // (PATCH * MERGE)) * (height // (PATCH * MERGE))


def prompt_for(num_images: int, words: str = "describe the images") -> str:
    """A raw Qwen2-VL prompt with ``num_images`` image placeholders."""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    return f"<|im_start|>user {vision} {words}<|im_end|> <|im_start|>assistant "


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(build_tiny_qwen2vl(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-qwen2vl"))
