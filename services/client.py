"""A small genie.v1 client: create a world from an image file, step it, save the frames as PNGs and a GIF.

Used by `genie client play`; also a readable example of the API for backend teams.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc

MAX_MESSAGE_BYTES = 32 * 2**20
API_KEY_ENV = "GENIE_API_KEY"  # the key a CLI sends when no --api-key-file is given


def api_key_from(key_file: Path | None) -> str | None:
    """The caller's API key: the file's content when given, else $GENIE_API_KEY (None: send no key)."""
    return key_file.read_text().strip() if key_file else os.environ.get(API_KEY_ENV)


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call."""

    def __init__(self, key: str):
        self._metadata = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        # grpc hands interceptors a namedtuple of call details
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_key(details), request_iterator)


def open_channel(address: str, api_key: str | None = None, ca_file: Path | None = None) -> grpc.Channel:
    """A channel to a genie.v1 server (gateway or job service): TLS when ca_file (the CA that signed the
    server's certificate) is given, every call carrying api_key when given."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if ca_file is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca_file.read_bytes()), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if api_key:
        channel = grpc.intercept_channel(channel, _ApiKey(api_key))
    return channel


def connect(address: str, api_key: str | None = None,
            ca_file: Path | None = None) -> tuple[grpc.Channel, world_pb2_grpc.WorldServiceStub]:
    """A channel to the gateway and its WorldService stub (see open_channel)."""
    channel = open_channel(address, api_key, ca_file)
    return channel, world_pb2_grpc.WorldServiceStub(channel)


@contextlib.contextmanager
def cli_errors(command: str) -> Iterator[None]:
    """For a CLI command that calls a genie.v1 server: its refusal (status and message: what to change) or a file that
    cannot be read (prompt, key, CA) ends the command with one line on stderr and exit status 2, not a traceback."""
    try:
        yield
    except grpc.RpcError as error:
        print(f"{command}: error: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def frame_pixels(frame: pb.Frame) -> np.ndarray:
    """A raw RGB frame message -> uint8 [H, W, 3]."""
    return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, frame.channels)


def play(stub: world_pb2_grpc.WorldServiceStub, image: Path, actions: Sequence[int], model: str = "",
         sampling: pb.SamplingParams | None = None) -> tuple[pb.World, list[np.ndarray]]:
    """Creates a world from an image file and plays the actions over one Play stream -> the world as created
    (its sampling with the model's defaults filled in) and all frames, the prompt's first."""
    if not model:
        model = stub.ListModels(pb.ListModelsRequest()).models[0].name
    created = stub.CreateWorld(pb.CreateWorldRequest(model=model, prompt=pb.PromptImage(encoded=image.read_bytes()),
                                                     sampling=sampling))
    world_id = created.world.world_id
    try:
        requests = (pb.PlayRequest(world_id=world_id, action=action) for action in actions)
        return created.world, [frame_pixels(created.frame)] + [frame_pixels(r.frame) for r in stub.Play(requests)]
    finally:
        stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))


def save_frames(frames: Sequence[np.ndarray], out: Path, frame_ms: int = 100) -> Path:
    """Writes frame_000.png, ... and play.gif into out; returns the GIF's path."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(frame) for frame in frames]
    for index, picture in enumerate(pictures):
        picture.save(out / f"frame_{index:03d}.png")
    gif = out / "play.gif"
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return gif
