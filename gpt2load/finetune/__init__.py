"""The book's fine-tuning recipes (chapter 6 classifier, chapter 7 instructions, LoRA), their data readers,
prompt templates, and predicting with a classifier."""
