"""The HTTP layer: one app factory, its middleware, dependencies, error handlers, schemas and routes.

Routes only parse a request and encode an answer; the work is the core's (`service.core`).
"""
