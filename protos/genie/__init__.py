"""Generated gRPC code of the public Genie API (genie.v1); regenerate with protos/generate.sh.

Imported by services and clients only, never by genie_models.
"""
