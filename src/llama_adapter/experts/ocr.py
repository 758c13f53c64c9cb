"""OCR through rapidocr-onnxruntime: its ONNX models ship in the wheel, so it runs offline."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..vision.images import load_image


class OCRExpert:
    """Text in the image through RapidOCR (offline ONNX models), lines above `min_confidence` only."""
    name = "ocr"

    def __init__(self, min_confidence: float = 0.5, prefix: str = "Text in the image: "):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError("the OCR expert needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime") from e
        self.engine = RapidOCR()
        self.min_confidence, self.prefix = min_confidence, prefix

    def read(self, image: Any) -> list[str]:
        """Recognised lines, top to bottom, then left to right."""
        result, _ = self.engine(np.asarray(load_image(image)))
        lines = [(box[0][1], box[0][0], text) for box, text, conf in (result or [])
                 if float(conf) >= self.min_confidence]
        return [text for _, _, text in sorted(lines)]

    def describe(self, image: Any) -> str:
        """The recognised lines joined by spaces after `prefix`; "" when nothing was read."""
        lines = self.read(image)
        return self.prefix + " ".join(lines) if lines else ""
