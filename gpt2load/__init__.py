"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .beam import beam_search
from .classify import classify
from .config import GPTConfig
from .download import download
from .errors import Gpt2LoadError
from .export import export, export_hf, export_pth, save_model
from .finetune import finetune_classify, finetune_instruct
from .generate import complete, generate, generate_stream
from .load import load_gpt2, load_tokenizer
from .lora import add_lora, merge_lora
from .model import GPTModel, KVCache
from .templates import format_instruction
from .train import train, train_on_files

__all__ = [
    "GPTConfig",
    "GPTModel",
    "Gpt2LoadError",
    "KVCache",
    "add_lora",
    "beam_search",
    "classify",
    "complete",
    "download",
    "export",
    "export_hf",
    "export_pth",
    "finetune_classify",
    "finetune_instruct",
    "format_instruction",
    "generate",
    "generate_stream",
    "load_gpt2",
    "load_tokenizer",
    "merge_lora",
    "save_model",
    "train_on_files",
    "train",
]
__version__ = "0.1.0"
