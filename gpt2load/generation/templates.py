"""Prompt templates that fine-tuned models record in their metadata (`prompt_template`), and their formatting."""

from __future__ import annotations

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# The template names a model folder's metadata may carry; one entry per format.
TEMPLATES = ("alpaca",)


def format_instruction(instruction: str, input: str = "") -> str:
    """The book's chapter-7 (Alpaca) prompt, up to and including the response header.

    Args:
        instruction: the task.
        input: optional extra input; its section is left out when empty.
    """
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def format_example(instruction: str, input: str, output: str) -> str:
    """A whole training example: the prompt followed by the response text (the caller appends <|endoftext|>)."""
    return format_instruction(instruction, input) + output
