"""Several HTTP worker processes in front of one engine process (`sowa serve --workers N`).

One event loop tops out near 600 single-image requests/s of HTTP parsing (docs/service.md), so the HTTP side
runs in N processes, each with its own loop, decoder threads and shared-memory image slots, and one engine
process owns the device, the batcher, the class registry and the banks. Workers stage images into their slots
and send small frames (protocol.py) over a Unix socket; the engine reads the images straight from the slots.
"""
