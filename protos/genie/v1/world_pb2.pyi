from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_FORMAT_UNSPECIFIED: _ClassVar[FrameFormat]
    FRAME_FORMAT_RAW_RGB: _ClassVar[FrameFormat]
    FRAME_FORMAT_PNG: _ClassVar[FrameFormat]
FRAME_FORMAT_UNSPECIFIED: FrameFormat
FRAME_FORMAT_RAW_RGB: FrameFormat
FRAME_FORMAT_PNG: FrameFormat

class RawImage(_message.Message):
    __slots__ = ("rgb", "width", "height")
    RGB_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    width: int
    height: int
    def __init__(self, rgb: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class PromptImage(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("num_maskgit_steps", "temperature", "seed", "action_guidance")
    NUM_MASKGIT_STEPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ACTION_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    num_maskgit_steps: int
    temperature: float
    seed: int
    action_guidance: float
    def __init__(self, num_maskgit_steps: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., action_guidance: _Optional[float] = ...) -> None: ...

class CreateWorldRequest(_message.Message):
    __slots__ = ("model", "prompt", "sampling", "output_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: PromptImage
    sampling: SamplingParams
    output_format: FrameFormat
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[_Union[PromptImage, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., output_format: _Optional[_Union[FrameFormat, str]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("format", "data", "width", "height", "channels")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    format: FrameFormat
    data: bytes
    width: int
    height: int
    channels: int
    def __init__(self, format: _Optional[_Union[FrameFormat, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class CreateWorldResponse(_message.Message):
    __slots__ = ("world", "frame")
    WORLD_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    world: World
    frame: Frame
    def __init__(self, world: _Optional[_Union[World, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class StepWorldRequest(_message.Message):
    __slots__ = ("world_id", "action", "format", "expected_step")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    action: int
    format: FrameFormat
    expected_step: int
    def __init__(self, world_id: _Optional[str] = ..., action: _Optional[int] = ..., format: _Optional[_Union[FrameFormat, str]] = ..., expected_step: _Optional[int] = ...) -> None: ...

class StepWorldResponse(_message.Message):
    __slots__ = ("world_id", "frame", "step")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    frame: Frame
    step: int
    def __init__(self, world_id: _Optional[str] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class PlayRequest(_message.Message):
    __slots__ = ("world_id", "action", "format", "expected_step")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    action: int
    format: FrameFormat
    expected_step: int
    def __init__(self, world_id: _Optional[str] = ..., action: _Optional[int] = ..., format: _Optional[_Union[FrameFormat, str]] = ..., expected_step: _Optional[int] = ...) -> None: ...

class PlayResponse(_message.Message):
    __slots__ = ("world_id", "frame", "step")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    frame: Frame
    step: int
    def __init__(self, world_id: _Optional[str] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class GetWorldRequest(_message.Message):
    __slots__ = ("world_id",)
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    def __init__(self, world_id: _Optional[str] = ...) -> None: ...

class World(_message.Message):
    __slots__ = ("world_id", "model", "sampling", "output_format", "step", "idle_seconds", "model_version")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    model: str
    sampling: SamplingParams
    output_format: FrameFormat
    step: int
    idle_seconds: float
    model_version: int
    def __init__(self, world_id: _Optional[str] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., output_format: _Optional[_Union[FrameFormat, str]] = ..., step: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., model_version: _Optional[int] = ...) -> None: ...

class ListWorldsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorldsResponse(_message.Message):
    __slots__ = ("worlds",)
    WORLDS_FIELD_NUMBER: _ClassVar[int]
    worlds: _containers.RepeatedCompositeFieldContainer[World]
    def __init__(self, worlds: _Optional[_Iterable[_Union[World, _Mapping]]] = ...) -> None: ...

class CloseWorldRequest(_message.Message):
    __slots__ = ("world_id",)
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    def __init__(self, world_id: _Optional[str] = ...) -> None: ...

class CloseWorldResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "num_actions", "image_size", "default_num_maskgit_steps", "default_temperature", "history_frames", "window_frames", "versions", "latest_version", "loaded_versions", "has_action_guidance", "default_action_guidance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_MASKGIT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HAS_ACTION_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ACTION_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_actions: int
    image_size: int
    default_num_maskgit_steps: int
    default_temperature: float
    history_frames: int
    window_frames: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    latest_version: int
    loaded_versions: _containers.RepeatedScalarFieldContainer[int]
    has_action_guidance: bool
    default_action_guidance: float
    def __init__(self, name: _Optional[str] = ..., num_actions: _Optional[int] = ..., image_size: _Optional[int] = ..., default_num_maskgit_steps: _Optional[int] = ..., default_temperature: _Optional[float] = ..., history_frames: _Optional[int] = ..., window_frames: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., latest_version: _Optional[int] = ..., loaded_versions: _Optional[_Iterable[int]] = ..., has_action_guidance: bool = ..., default_action_guidance: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...
