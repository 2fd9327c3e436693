"""Translation between genie.v1 messages and the gateway's domain objects (no logic of its own).

Frames are encoded here (raw RGB or PNG) because the wire format is an API concern, not the domain's.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from genie.v1 import world_pb2 as pb
from services.gateway.errors import InvalidArgument
from services.gateway.gateway import SamplingRequest
from services.gateway.prompts import ImageLimits, decode_encoded, decode_raw
from services.gateway.versions import ModelListing
from services.gateway.worlds import idle_seconds
from services.stores.catalog import split_key
from services.worldstore.base import WorldRecord


def prompt_image(prompt: pb.PromptImage, limits: ImageLimits) -> np.ndarray:
    source = prompt.WhichOneof("source")
    if source == "encoded":
        return decode_encoded(prompt.encoded, limits)
    if source == "raw":
        return decode_raw(prompt.raw.rgb, prompt.raw.width, prompt.raw.height, limits)
    raise InvalidArgument("CreateWorld needs a prompt image: set prompt.encoded (PNG/JPEG bytes) or prompt.raw")


def sampling_request(sampling: pb.SamplingParams) -> SamplingRequest:
    temperature = sampling.temperature if sampling.HasField("temperature") else None
    guidance = sampling.action_guidance if sampling.HasField("action_guidance") else None
    return SamplingRequest(sampling.seed, sampling.num_maskgit_steps, temperature, guidance)


def frame_message(pixels: np.ndarray, frame_format: int) -> pb.Frame:
    height, width, channels = pixels.shape
    if frame_format == pb.FRAME_FORMAT_PNG:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        frame_format, data = pb.FRAME_FORMAT_RAW_RGB, np.ascontiguousarray(pixels).tobytes()
    return pb.Frame(format=frame_format, data=data, width=width, height=height, channels=channels)


def frame_format(requested: int, default: int) -> int:
    """The requested format, else the default."""
    if requested not in pb.FrameFormat.values():
        raise InvalidArgument(f"unknown frame format {requested}; use FRAME_FORMAT_RAW_RGB or FRAME_FORMAT_PNG")
    return requested or default


def world_message(record: WorldRecord) -> pb.World:
    sampling = pb.SamplingParams(num_maskgit_steps=record.num_maskgit_steps, temperature=record.temperature,
                                 seed=record.seed, action_guidance=record.action_guidance)
    name, version = split_key(record.model)
    return pb.World(world_id=record.world_id, model=name, sampling=sampling,
                    output_format=record.output_format or pb.FRAME_FORMAT_RAW_RGB, step=record.step,
                    idle_seconds=idle_seconds(record), model_version=version or 0)


def model_message(listing: ModelListing) -> pb.Model:
    info = listing.info
    return pb.Model(name=info.name, num_actions=info.num_actions, image_size=info.image_size,
                    default_num_maskgit_steps=info.default_maskgit_steps,
                    default_temperature=info.default_temperature, history_frames=info.history_frames,
                    window_frames=info.window_frames, versions=listing.versions, latest_version=listing.latest,
                    loaded_versions=listing.loaded, has_action_guidance=info.default_action_guidance is not None,
                    default_action_guidance=info.default_action_guidance or 0.0)
