"""The HTTP server: an OpenAI-compatible moderation endpoint and a native classify endpoint.

`schemas.py` holds the request/response models, `batcher.py` the dynamic batcher that merges
concurrent requests into one model batch, `app.py` the FastAPI app factory (no model code:
it is handed a loaded guard), `middleware.py` the API-key and body-size checks, `validation.py`
the 422 messages, `streams.py` the streaming WebSocket and `engine.py` vLLM's async engine. `reasonguard serve` (commands/serve.py) loads the guard and runs
uvicorn.

Example:
    >>> from reasonguard.infer.guard import load_guard
    >>> from reasonguard.serve.app import ServeSettings, create_app
    >>> app = create_app(load_guard("smollm2"), ServeSettings(model_name="smollm2"))
    >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
"""
