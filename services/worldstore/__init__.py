"""World stores: where the gateway keeps each world's truth (`memory`, the embedded default; `redis`)."""
