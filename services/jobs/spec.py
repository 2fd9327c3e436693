"""What a job may ask for, checked at submit so a bad request is refused there, never failing later."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.stores.base import ObjectStore
from services.stores.catalog import check_model_name
from services.stores.datasets import dataset_videos

PRESETS = ("tiny", "coinrun")  # the genie_models presets (TOKENIZER_PRESETS etc.); kept here so no torch import
# name -> (lowest, highest, what it sets)
OVERRIDES: dict[str, tuple[int, int, str]] = {
    "tokenizer_steps": (1, 10_000_000, "training steps of the tokenizer"),
    "lam_steps": (0, 10_000_000, "steps of the LAM-alone phase before dynamics (0: co-train LAM and dynamics)"),
    "dynamics_steps": (1, 10_000_000, "training steps of dynamics (with the LAM, or after it)"),
    "batch_size": (1, 4096, "clips per training batch (both stages)"),
    "checkpoint_every": (1, 10_000_000, "steps between checkpoints (both stages)"),
    "eval_clips": (1, 100_000, "held-out clips evaluated"),
    "eval_horizon": (1, 256, "frames generated per evaluated clip"),
    "seed": (0, 2**31 - 1, "random seed of data sampling and initialisation"),
}
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidJob(ValueError):
    """A request that names an unknown preset, override or dataset; the message says what to send instead."""


@dataclass(frozen=True)
class JobSpec:
    dataset: str
    preset: str
    model_name: str
    overrides: dict[str, int]


def validate(store: ObjectStore, dataset: str, preset: str, overrides: dict[str, str], model_name: str) -> JobSpec:
    """Check every field (the dataset against the store) and return the typed spec."""
    spec = parse(dataset, preset, overrides, model_name)
    if not dataset_videos(store, dataset):
        raise InvalidJob(f"dataset {dataset!r} has no videos in the {store.description}; upload a folder with "
                         f"`genie datasets upload DIR --name {dataset}` (or put videos under datasets/{dataset}/)")
    return spec


def parse(dataset: str, preset: str, overrides: dict[str, str], model_name: str) -> JobSpec:
    """Check every field but the dataset's presence in the store and return the typed spec."""
    if preset not in PRESETS:
        raise InvalidJob(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    parsed: dict[str, int] = {}
    for name, text in overrides.items():
        if name not in OVERRIDES:
            raise InvalidJob(f"unknown override {name!r}; allowed: "
                             + "; ".join(f"{key} ({what})" for key, (_, _, what) in OVERRIDES.items()))
        low, high, _ = OVERRIDES[name]
        try:
            value = int(text)
        except ValueError:
            raise InvalidJob(f"override {name}={text!r} is not an integer") from None
        if not low <= value <= high:
            raise InvalidJob(f"override {name}={value} is out of range [{low}, {high}]")
        parsed[name] = value
    if not _DATASET.match(dataset):
        raise InvalidJob(f"invalid dataset name {dataset!r}: use letters, digits, '.', '_', '-'")
    model_name = model_name or dataset.lower()
    try:
        check_model_name(model_name)
    except ValueError as error:
        raise InvalidJob(str(error)) from None
    return JobSpec(dataset, preset, model_name, parsed)
