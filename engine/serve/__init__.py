"""phiforge.engine.serve: the continuous-batching engine a service embeds (vLLM v1's and nano-vllm's roles).

    request.py      Request in, a Handle streaming Deltas, then a Result; the engine's errors
    engine.py       Engine: one model, one scheduler thread, many concurrent requests
    scheduler.py    what each step computes: decodes for running rows, prompt chunks for admitted ones
    kv_memory.py    one static KV cache, a row per running request; admission and prefix reuse
    decode.py       the one-token decode step over every running row (native C, or torch)
    decode_graph.py the decode step with static shapes, replayed as one CUDA graph
    multi_lora.py   many resident adapters, each row of a batch its own (or none)
    sampling.py     penalties, temperature, top-k, top-p, a seeded draw per request
    detokenize.py   token ids in, text pieces out: never half a character, never half a stop string
    generate.py     Generator: the blocking / streaming client over one Engine (the CLI's and evaluate's)
"""
