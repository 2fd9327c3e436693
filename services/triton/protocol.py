"""The wire contract between the Triton model services and `TritonBackend`: model and tensor names, status codes.

Imported by both sides, so it holds no torch: the gateway process never loads model code.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from enum import IntEnum

from services.backends.base import ModelInfo

# Fixed Triton model names: one world model per service process, so names need no prefix, and the
# service's world model name travels in the `info` model's answer (checked by the backend).
INFO = "info"
TOKENIZER_ENCODE = "tokenizer_encode"
TOKENIZER_START = "tokenizer_start"
TOKENIZER_DECODE = "tokenizer_decode"
TOKENIZER_END = "tokenizer_end"
LAM_LABEL = "lam_label"
DYNAMICS_START = "dynamics_start"
DYNAMICS_STEP = "dynamics_step"
DYNAMICS_END = "dynamics_end"

# A service started with --catalog serves published versions: each version's models are bound at run time under
# versioned names (`dynamics_step_v3`), on a gateway's `control` request (COMMAND JSON in, LOADED JSON out):
# {"action": "load" | "unload", "version": N, "holder": GATEWAY_ID} -> {"loaded": [versions]}. A version stays
# loaded while any holder (gateway) holds it, so gateways sharing the services cannot unload each other's.
# A hold is a lease: a gateway renews its holds by sending "load" again every HOLD_RENEW_S; a hold not renewed for
# the service's --hold-lease-s lapses, so a gateway that died (SIGKILL, lost node) leaks no version for long.
CONTROL = "control"
CONTROL_TIMEOUT_S = 300.0  # one load: a version of the coinrun preset downloads and binds well within this
HOLD_LEASE_S = 120.0  # a service's default lease
HOLD_RENEW_S = 30.0  # a gateway's default renewal period: several renewals fit in one lease

SERVICE_KINDS = ("tokenizer", "lam", "dynamics")
MODELS_BY_KIND = {
    "tokenizer": (INFO, TOKENIZER_ENCODE, TOKENIZER_START, TOKENIZER_DECODE, TOKENIZER_END),
    "lam": (INFO, LAM_LABEL),
    "dynamics": (INFO, DYNAMICS_START, DYNAMICS_STEP, DYNAMICS_END),
}

# World model names appear in settings, logs and the info answer; keep them to a portable charset.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def versioned(model: str, version: int | None) -> str:
    """The Triton model name of `model` for one published version; the bare name for a fixed checkpoint."""
    return model if version is None else f"{model}_v{version}"


def control_command(action: str, version: int, holder: str) -> bytes:
    return json.dumps({"action": action, "version": version, "holder": holder}).encode()


class Status(IntEnum):
    """Per-request outcome of a batched model: a batch mixes worlds, so one failure must not fail the rest."""

    OK = 0
    NOT_CACHED = 1  # the world has no cache in this process: restart it from history
    INVALID = 2  # the request's values are out of range for this model


def info_to_json(info: ModelInfo, kind: str) -> bytes:
    return json.dumps(asdict(info) | {"service": kind}).encode()


def info_from_json(payload: bytes) -> tuple[ModelInfo, str]:
    """-> (model info, the kind of service that answered)."""
    values = json.loads(payload)
    kind = values.pop("service")
    return ModelInfo(**values), kind
