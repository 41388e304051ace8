"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .beam import beam_search
from .classifier import classify
from .config import GPTConfig
from .decoding import BookModelWarning, PromptTruncatedWarning, left_pad
from .errors import Gpt2LoadError
from .evaluation import evaluate
from .exports import export, export_hf, export_pth, save_model
from .finetune import finetune_classify, finetune_instruct
from .generation import generate, generate_stream
from .gguf import export_gguf
from .hub import download
from .load import load_gpt2, load_tokenizer
from .lora import add_lora, merge_lora
from .model import GPTModel, KVCache
from .pretrain import train_on_files
from .sampling import GenerationConfig
from .templates import format_instruction
from .tensors import iter_tensors
from .text import complete
from .training import TrainConfig, train

__all__ = [
    "BookModelWarning",
    "GPTConfig",
    "GPTModel",
    "GenerationConfig",
    "Gpt2LoadError",
    "KVCache",
    "PromptTruncatedWarning",
    "TrainConfig",
    "add_lora",
    "beam_search",
    "classify",
    "complete",
    "download",
    "evaluate",
    "export",
    "export_gguf",
    "export_hf",
    "export_pth",
    "finetune_classify",
    "finetune_instruct",
    "format_instruction",
    "generate",
    "generate_stream",
    "iter_tensors",
    "left_pad",
    "load_gpt2",
    "load_tokenizer",
    "merge_lora",
    "save_model",
    "train_on_files",
    "train",
]
__version__ = "0.1.0"
