"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from .errors import Gpt2LoadError
from .finetune.classify import classify
from .finetune.recipes import finetune_classify, finetune_instruct
from .formats.exports import export, export_hf, export_pth, save_model
from .formats.gguf import export_gguf
from .generation.beam import beam_search
from .generation.decoding import BookModelWarning, PromptTruncatedWarning, left_pad
from .generation.generate import generate, generate_stream
from .generation.sampling import GenerationConfig
from .generation.templates import format_instruction
from .generation.text import complete
from .hub.fetch import download
from .load import load_gpt2, load_tokenizer
from .model.config import GPTConfig
from .model.gpt import GPTModel, KVCache
from .model.lora import add_lora, merge_lora
from .tensors import iter_tensors
from .training.evaluation import evaluate
from .training.loop import TrainConfig, train
from .training.pretrain import train_on_files

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
