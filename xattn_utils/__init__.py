"""xattn: how much does cross-attention explain in speech-to-text models?"""

from .attention import CrossAttention, cross_attention
from .audio import load_audio
from .decode import Transcript, decode
from .models import LoadedModel, available_models, load_model

__all__ = [
    "CrossAttention",
    "LoadedModel",
    "Transcript",
    "available_models",
    "cross_attention",
    "decode",
    "load_audio",
    "load_model",
]
