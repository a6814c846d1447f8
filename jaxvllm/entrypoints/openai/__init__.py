"""The OpenAI-compatible server: `build_app(AsyncLLMEngine)` (server.py), the request and
response models (protocol.py), one handler module per endpoint (serving_*.py), the ASGI
middlewares (middleware.py) and the Prometheus metrics (metrics.py). `jaxvllm serve` runs it."""
