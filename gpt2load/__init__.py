"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .beam import beam_search
from .config import GPTConfig
from .download import download
from .errors import Gpt2LoadError
from .export import export, export_hf, export_pth, save_model
from .generate import complete, generate, generate_stream
from .gguf import export_gguf
from .load import load_gpt2, load_tokenizer
from .model import GPTModel, KVCache
from .tensors import iter_tensors
from .train import train, train_on_files

__all__ = [
    "GPTConfig",
    "GPTModel",
    "Gpt2LoadError",
    "KVCache",
    "beam_search",
    "complete",
    "download",
    "export",
    "export_gguf",
    "export_hf",
    "export_pth",
    "generate",
    "generate_stream",
    "iter_tensors",
    "load_gpt2",
    "load_tokenizer",
    "save_model",
    "train_on_files",
    "train",
]
__version__ = "0.1.0"
