"""Files on disk: the TensorFlow-free checkpoint reader, safetensors written tensor by tensor, the name maps
between layouts (as data), what a folder holds (layouts), the conversion cache, tensor views and the exports
(gpt2load's form, a transformers folder, the book's .pth, GGUF)."""
