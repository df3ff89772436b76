"""The Open Inference Protocol v2 over gRPC: a front end beside service.http, on the core alone (server.py), and
the stubs generated from KServe's published proto (proto/)."""
