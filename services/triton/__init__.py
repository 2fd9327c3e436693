"""The three Triton model services (tokenizer, latent actions, dynamics), each its own PyTriton process.

`serve.py` starts one; `protocol.py` is the wire contract shared with `services/backends/triton.py`.
"""
