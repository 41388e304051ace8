"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .config import GPTConfig
from .errors import Gpt2LoadError
from .export import export, export_hf, export_pth, save_model
from .load import load_gpt2, load_tokenizer
from .model import GPTModel, KVCache


def __getattr__(name: str):
    # Generation, downloads and training pull in more code; import them on first use.
    if name in ("generate", "beam_search", "generate_stream", "complete"):
        from . import generate as _generate

        return getattr(_generate, name)
    if name == "download":
        from .download import download

        return download
    if name == "train":
        from .train import train

        return train
    raise AttributeError(f"module 'gpt2load' has no attribute {name!r}")


__all__ = [
    "GPTConfig",
    "GPTModel",
    "Gpt2LoadError",
    "KVCache",
    "beam_search",
    "complete",
    "download",
    "export",
    "export_hf",
    "export_pth",
    "generate",
    "generate_stream",
    "load_gpt2",
    "load_tokenizer",
    "save_model",
    "train",
]
__version__ = "0.1.0"
