"""phiforge.engine.formats.gguf: GGUF files, llama.cpp's format.

    names.py    the architecture, phiforge's metadata key and the Phi-3 <-> GGUF tensor names both sides use
    reader.py   a phi3 GGUF as a config and tensors, dequantized one at a time (load_model(path.gguf))
    writer.py   export_gguf: a model (+ merged adapter) as a GGUF for llama.cpp / Ollama / LM Studio
    vocab.py    the tokenizer as GGUF vocab, merges and token types, and back
"""
