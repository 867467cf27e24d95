"""Random-weight stand-ins for the isolation models, written in the weights-folder layout.

For tests and benchmarks on machines without the real weights (and without a hub): the files
land where ``tasks.isolation_weights`` looks for the real ones, so the production loaders read
them. The architectures are the real classes: YOLO built from its ultralytics model yaml,
OWL-ViT from an ``OwlViTConfig`` (tiny towers for tests, the default base-patch32 size for
benchmarks) with a CLIP tokenizer over a small vocabulary written here, SAM from
``segment_anything``'s registry. Their outputs are meaningless; their cost and wiring are real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.isolation_weights import offline_model_environment

# A byte-level BPE vocabulary without merges: every word is spelt letter by letter. Enough for
# OWL-ViT's tokenizer to turn any lower-case ASCII product name into ids.
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
_TOKENS = _LETTERS + [f"{c}</w>" for c in _LETTERS] + ["!", "!</w>"]
# End of text last: OWL-ViT's text tower pools at the highest id, as with CLIP's real vocabulary.
TINY_VOCAB = {**{t: i for i, t in enumerate(_TOKENS)}, "<|startoftext|>": len(_TOKENS), "<|endoftext|>": len(_TOKENS) + 1}
_BOS, _EOS = len(_TOKENS), len(_TOKENS) + 1


def coco_names() -> dict[int, str]:
    """The 80 COCO class names, from the dataset yaml that ships with ultralytics."""
    import ultralytics  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    data = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())
    return {int(k): str(v) for k, v in data["names"].items()}


def write_random_yolo(weights_dir: Path, file_name: str = "yolov8n.pt", seed: int = 0) -> Path:
    """A YOLOv8 checkpoint with random weights built from ``<stem>.yaml`` (``yolov8x.pt`` → ``yolov8x.yaml``), COCO names."""
    offline_model_environment()
    import torch  # noqa: PLC0415
    from ultralytics import YOLO  # noqa: PLC0415

    torch.manual_seed(seed)
    model = YOLO(Path(file_name).stem + ".yaml", task="detect")
    model.model.names = coco_names()
    path = Path(weights_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def tiny_clip_tokenizer(max_length: int = 16) -> Any:
    """A ``CLIPTokenizer`` over :data:`TINY_VOCAB` (no hub, no files needed)."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    return CLIPTokenizer(vocab=dict(TINY_VOCAB), merges=[], model_max_length=max_length)


def tiny_owlvit_config() -> Any:
    """An ``OwlViTConfig`` with two-layer, 32-wide towers over 64-pixel inputs (16 patches)."""
    from transformers import OwlViTConfig  # noqa: PLC0415

    text = {"vocab_size": len(TINY_VOCAB), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": _BOS, "eos_token_id": _EOS,
            "pad_token_id": _EOS}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16}
    return OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)


def write_random_owlvit(weights_dir: Path, folder: str = "owlvit-base-patch32", config: Any = None,
                        seed: int = 0) -> Path:
    """An OWL-ViT snapshot folder: random model of ``config`` (default: base-patch32 size), processor, tokenizer."""
    offline_model_environment()
    import torch  # noqa: PLC0415
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor  # noqa: PLC0415

    torch.manual_seed(seed)
    config = config if config is not None else OwlViTConfig(text_config={
        "vocab_size": len(TINY_VOCAB), "bos_token_id": _BOS, "eos_token_id": _EOS, "pad_token_id": _EOS})
    side = int(config.vision_config.image_size)
    path = Path(weights_dir) / folder
    OwlViTForObjectDetection(config).save_pretrained(str(path))
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": side, "width": side},
                                                                     crop_size={"height": side, "width": side}),
                                tokenizer=tiny_clip_tokenizer(int(config.text_config.max_position_embeddings)))
    processor.save_pretrained(str(path))
    (path / "RANDOM_WEIGHTS.json").write_text(json.dumps({"note": "random weights from tools/random_weights.py"}))
    return path


def tiny_sam_builder(checkpoint: str | None = None) -> Any:
    """A ``segment_anything.Sam`` from the package's real classes, shrunk: a 256-pixel input, a 2-layer,
    32-wide image encoder and a 32-wide, 1-layer mask decoder (same signature as the registry's builders)."""
    from functools import partial  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: PLC0415

    size, patch, dim = 256, 16, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, global_attn_indexes=(1,), window_size=8),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint))
    return sam


def write_random_sam(weights_dir: Path, file_name: str = "sam_vit_b_01ec64.pth", model_type: str = "vit_b",
                     seed: int = 0) -> Path:
    """A SAM state dict with random weights for ``sam_model_registry[model_type]``."""
    offline_model_environment()
    import torch  # noqa: PLC0415
    from segment_anything import sam_model_registry  # noqa: PLC0415

    torch.manual_seed(seed)
    model = sam_model_registry[model_type](checkpoint=None)
    path = Path(weights_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
