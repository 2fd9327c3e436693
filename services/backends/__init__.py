"""Model backends: how the gateway reaches the models (in process, or Triton over gRPC)."""
