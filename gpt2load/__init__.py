"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .beam import beam_search
from .config import GPTConfig
from .errors import Gpt2LoadError
from .evaluation import evaluate
from .export import export, export_hf, export_pth, save_model
from .generate import complete, generate, generate_stream
from .hub import download
from .load import load_gpt2, load_tokenizer
from .model import GPTModel, KVCache
from .pretrain import train_on_files
from .training import TrainConfig, train

__all__ = [
    "GPTConfig",
    "GPTModel",
    "Gpt2LoadError",
    "KVCache",
    "TrainConfig",
    "beam_search",
    "complete",
    "download",
    "evaluate",
    "export",
    "export_hf",
    "export_pth",
    "generate",
    "generate_stream",
    "load_gpt2",
    "load_tokenizer",
    "save_model",
    "train_on_files",
    "train",
]
__version__ = "0.1.0"
