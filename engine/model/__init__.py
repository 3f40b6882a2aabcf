"""phiforge.engine.model: the Phi-3 model as Hugging Face lays it out, and the layers it is built from.

    config.py      Phi3Config: one dataclass for the family (mini-4k, mini-128k / 3.5-mini, medium, 4-mini), presets
    phi3.py        Phi3ForCausalLM: the module tree under Hugging Face's names, the KV cache, RoPE and LongRoPE
    tokenizer.py   the tokenizer and its chat template (a tokenizer.json and tokenizer_config.json)
    weights.py     safetensors weight files: read (single or sharded, memory-mapped), write atomically, resolve a
                   model spec (directory or Hugging Face id)
    quant.py       NF4Linear, one weight's bitsandbytes tensors, quantize a dense model in place
    lora.py        LoRALinear (y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ over a dense or NF4 base), apply, merge
"""
