"""The OpenAI-compatible HTTP server (``moegpt serve``): a thin layer over one ``LLMEngine``.

    protocol.py    request schemas (OpenAI's fields), checked into engine Requests
    errors.py      OpenAI-style error bodies and the exception the routes raise
    chat.py        the chat template (Jinja, stored with the tokenizer) -> prompt text
    output.py      engine updates -> OpenAI responses, streaming chunks and logprobs
    engine_loop.py the engine's own thread; admission (429), aborts, shutdown draining
    metrics.py     Prometheus metrics (``moegpt:`` names) from the engine's counters
    app.py         the routes (no scheduling logic)
    server.py      model loading, uvicorn, graceful SIGTERM, the CLI subcommand
"""
