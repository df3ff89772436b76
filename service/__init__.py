"""The inference service: FastAPI app, dynamic batcher, class registry, codecs, metrics, settings.

Imports `model` only; `create_app(settings)` builds everything, nothing happens at import.
"""
