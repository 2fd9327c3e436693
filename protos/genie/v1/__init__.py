"""genie.v1: the world/session API of the gateway (world_pb2, world_pb2_grpc).

Stubs are generated from world.proto by protos/generate.sh and committed.
"""
