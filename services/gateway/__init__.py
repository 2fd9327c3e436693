"""The session gateway: worlds, limits, cross-session step batching, and the genie.v1 gRPC server.

Domain logic (worlds.py, prompts.py, batcher.py, gateway.py) is plain Python; server.py is the thin gRPC layer.
"""
