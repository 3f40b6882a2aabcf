"""phiforge.engine.api: the OpenAI-compatible HTTP server over one Engine (`phiforge serve`).

    server.py       the FastAPI app: chat and text completions (streamed as SSE or not), models, adapters, health,
                    metrics; errors in OpenAI's shape
    protocol.py     request bodies -> engine Requests (every field checked), results -> OpenAI's response shapes
    prometheus.py   the /metrics text format: counters, gauges and histograms
"""
