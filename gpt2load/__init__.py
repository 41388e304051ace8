"""gpt2load: OpenAI's GPT-2 weights in the book's GPTModel, without TensorFlow."""

from gpt2load.errors import Gpt2LoadError
from gpt2load.finetune.classify import classify
from gpt2load.finetune.recipes import finetune_classify, finetune_instruct
from gpt2load.formats.exports import export, export_hf, export_pth, save_model
from gpt2load.formats.gguf import export_gguf
from gpt2load.generation.beam import beam_search
from gpt2load.generation.decoding import BookModelWarning, PromptTruncatedWarning, left_pad
from gpt2load.generation.generate import generate, generate_stream
from gpt2load.generation.sampling import GenerationConfig
from gpt2load.generation.templates import format_instruction
from gpt2load.generation.text import complete
from gpt2load.hub.fetch import download
from gpt2load.load import load_gpt2, load_tokenizer
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel, KVCache
from gpt2load.model.lora import add_lora, merge_lora
from gpt2load.tensors import iter_tensors
from gpt2load.training.evaluation import evaluate
from gpt2load.training.loop import TrainConfig, train
from gpt2load.training.pretrain import train_on_files

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
