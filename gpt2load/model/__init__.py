"""The model: its config and presets, the book's GPTModel with a KV cache, building it without random
initialisation, LoRA adapters and int8 modules."""
