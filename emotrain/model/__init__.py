"""The model: pretrained encoders, cross-modal attention, statistics pooling, classifier."""

from emotrain.model.emotion_model import (
    EmotionModel,
    EmotionModelOutput,
    build_model,
    load_processors,
)
from emotrain.model.encoders import build_processors

__all__ = ["EmotionModel", "EmotionModelOutput", "build_model", "build_processors", "load_processors"]
