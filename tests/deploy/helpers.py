"""What the deploy tests share: the `genie` command's parser, the settings classes by env prefix, Compose
interpolation, Dockerfile entrypoints, and the rendered Kubernetes overlays."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from services.settings import GatewaySettings, JobsSettings, StoreSettings, WorkerSettings
from services.triton.cli import ServiceSettings
from tests.deploy.tools import run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TLS_OVERLAYS = ("cpu-tls", "gpu-tls")  # cpu and gpu with deploy/k8s/components/tls
OVERLAYS = ("cpu", "gpu", *TLS_OVERLAYS)
SETTINGS_BY_PREFIX = {cls.model_config["env_prefix"]: cls
                      for cls in (GatewaySettings, StoreSettings, JobsSettings, WorkerSettings)}


def genie_parser() -> argparse.ArgumentParser:
    """The `genie` parser with the services' subcommands, built the way services/cli.py's main() builds it."""
    from services.cli import register

    parser = argparse.ArgumentParser(prog="genie", exit_on_error=False)
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parses a container's full argv (entrypoint + command); fails the test if genie would reject it."""
    assert argv and argv[0] == "genie", f"every genie container runs the genie command, not {argv[:1]}"
    try:
        return genie_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(f"`{' '.join(argv)}` is not a valid genie command (argparse exit {exit_.code})")


def dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    assert len(lines) == 1, f"{dockerfile} needs exactly one exec-form ENTRYPOINT"
    return json.loads(lines[0].removeprefix("ENTRYPOINT "))


def settings_field(name: str) -> tuple[type, str]:
    """GENIE_GATEWAY_MAX_WORLDS -> (GatewaySettings, 'max_worlds'); fails for a name no settings class reads."""
    for prefix, cls in SETTINGS_BY_PREFIX.items():
        if name.startswith(prefix):
            field = name.removeprefix(prefix).lower()
            assert field in cls.model_fields, f"{name}: {cls.__name__} has no field {field!r} " \
                                              f"(fields: {', '.join(cls.model_fields)})"
            return cls, field
    pytest.fail(f"{name} has no settings class; prefixes are {', '.join(SETTINGS_BY_PREFIX)}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} -> default and ${VAR:?message} -> a stand-in (the value a user must set)."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "set-by-operator", value).replace("$$", "$")


# Sequences Compose merges (unique entries, base first) when a second -f file names them; others it replaces.
MERGED_SEQUENCES = {"secrets", "ports", "expose", "volumes", "configs"}


def merge_compose(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override config` for the keys these files use: mappings merge, a `command` or
    healthcheck `test` is replaced, secrets/ports/expose/volumes are merged. (No Compose engine runs in CI.)"""
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            merged[name] = merge_compose(base[name], value)
        elif isinstance(value, list) and name in MERGED_SEQUENCES and isinstance(base.get(name), list):
            merged[name] = base[name] + [item for item in value if item not in base[name]]
        else:
            merged[name] = value
    return merged


def subject_names(certificate: Path) -> set[str]:
    """The DNS names and IP addresses a PEM certificate's subjectAltName lists ('localhost', '127.0.0.1')."""
    result = run("openssl", "x509", "-in", str(certificate), "-noout", "-ext", "subjectAltName")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?:DNS|IP Address):([^,\s]+)", result.stdout))


def extended_key_usages(certificate: Path) -> str:
    return run("openssl", "x509", "-in", str(certificate), "-noout", "-ext", "extendedKeyUsage").stdout


def render(overlay: str) -> list[dict]:
    """Every object `kubectl kustomize deploy/k8s/overlays/<overlay>` renders."""
    result = run("kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[type, object]:
    """Builds each settings class the GENIE_* variables in `env` name, from exactly those variables, so a
    value the service would reject at start-up (bad JSON, out-of-range port) fails here."""
    for name in [name for name in __import__("os").environ if name.startswith("GENIE_")]:
        monkeypatch.delenv(name)
    classes = set()
    for name, value in env.items():
        if name.startswith("GENIE_"):
            classes.add(settings_field(name)[0])
            monkeypatch.setenv(name, value)
    return {cls: cls() for cls in classes}


def service_settings(args: argparse.Namespace) -> ServiceSettings:
    """A parsed `genie serve tokenizer|lam|dynamics` -> its settings, without checking that its files exist here."""
    return ServiceSettings(**{field.name: getattr(args, field.name) for field in fields(ServiceSettings)})


# The genie services started by a command, and the settings prefixes each one reads.
PREFIXES_BY_SERVICE = {"gateway": ("GENIE_GATEWAY_",), "jobs": ("GENIE_JOBS_", "GENIE_STORE_"),
                       "worker": ("GENIE_WORKER_", "GENIE_STORE_"),
                       "tokenizer": (), "lam": (), "dynamics": ()}


def service_of(args: argparse.Namespace) -> str:
    """`genie serve dynamics ...` -> 'dynamics'; `genie worker` -> 'worker'."""
    return args.service if args.command == "serve" else args.command
