"""The service's core: everything that scores, batches, holds classes and persists them, with no web framework.

batcher, engine, registry, store/, uploads and staging, codecs, errors, results, settings and telemetry. The HTTP
layer (`service.http`) and the worker processes (`service.workers`) are built on it; it imports neither.
"""
