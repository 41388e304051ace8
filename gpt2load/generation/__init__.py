"""Generation as functions on tensors: sampling, the decoders every path uses, generate/generate_stream,
beam search, and text in and out (stop strings, `complete`)."""
