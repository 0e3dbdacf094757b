"""Model cards, inference backends and the segmenter that turns frames into instance labels."""

from livemask.inference.backend import Backend, create_backend
from livemask.inference.models import ModelCard, list_models, load_model_card
from livemask.inference.segmenter import Segmenter

__all__ = ["Backend", "ModelCard", "Segmenter", "create_backend", "list_models", "load_model_card"]
