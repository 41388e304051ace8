"""Files on disk: the TensorFlow-free checkpoint reader, safetensors written tensor by tensor, the name maps
between layouts (as data), one source object per layout that opens its files once (layouts, weightfiles), the
conversion cache, tensor views and the exports (gpt2load's own form in ownform, a transformers folder, the book's
.pth, GGUF)."""
