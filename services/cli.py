"""The services' subcommands of the `genie` CLI: `serve gateway|tokenizer|lam|dynamics|stack` and `client play`.

Found by genie_models.cli through the entry point group `genie.cli` (services = "services.cli:register").
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from genie_models.allocator import keep_freed_memory


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run one service (settings from GENIE_* environment variables)")
    serve_sub = serve.add_subparsers(dest="service", required=True)
    gateway = serve_sub.add_parser("gateway", help="the genie.v1 session gateway (GENIE_GATEWAY_*)")
    gateway.add_argument("--port", type=int, help="gRPC port (overrides GENIE_GATEWAY_PORT)")
    gateway.add_argument("--metrics-port", type=int, help="Prometheus port (overrides GENIE_GATEWAY_METRICS_PORT)")
    gateway.add_argument("--backend", help="backend plugin name (overrides GENIE_GATEWAY_BACKEND)")
    gateway.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                         help="serve the world checkpoint DIR as NAME (repeatable; adds to GENIE_GATEWAY_MODELS)")
    gateway.set_defaults(handler=_serve_gateway)
    _register_model_services(serve_sub)
    _register_stack(serve_sub)
    from services.jobs.cli import register as register_jobs  # serve jobs, jobs, worker, datasets, models

    register_jobs(subparsers, serve_sub)

    client = subparsers.add_parser("client", help="talk to a running gateway")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    play = client_sub.add_parser("play", help="create a world from an image, play actions, save PNGs and a GIF")
    play.add_argument("--address", default="127.0.0.1:50051", help="gateway host:port")
    play.add_argument("--image", type=Path, required=True, help="prompt image (PNG or JPEG, any size)")
    play.add_argument("--actions", type=action_list, default=[0, 1, 2, 3],
                      help="comma-separated latent actions (default 0,1,2,3)")
    play.add_argument("--model", default="", help="model name (default: the gateway's first model)")
    play.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    play.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the model's)")
    play.add_argument("--maskgit-steps", type=passes, default=0,
                      help="MaskGIT passes per frame (default 0: the model's)")
    play.add_argument("--action-guidance", type=float,
                      help="how strongly actions steer the frames, 0-100 (default: the model's; ListModels says "
                           "which models take it)")
    play.add_argument("--out", type=Path, required=True, help="directory for frame_*.png and play.gif")
    add_caller_options(play, "gateway")
    play.set_defaults(handler=_client_play)
    models = client_sub.add_parser("models", help="list the gateway's models: actions, frame size, versions and "
                                   "sampling defaults (ListModels as JSON)")
    models.add_argument("--address", default="127.0.0.1:50051", help="gateway host:port")
    add_caller_options(models, "gateway")
    models.set_defaults(handler=_client_models)


def add_caller_options(parser: argparse.ArgumentParser, server: str) -> None:
    """--api-key-file and --ca-file of a command that calls a genie.v1 server (services/client.py reads them)."""
    parser.add_argument("--api-key-file", type=Path, help="file holding your API key, sent as 'authorization: "
                        "Bearer KEY' (default: the key in $GENIE_API_KEY; neither: no key)")
    parser.add_argument("--ca-file", type=Path, help=f"CA certificate of a TLS {server} (default: plaintext)")


def _register_model_services(serve_sub: argparse._SubParsersAction) -> None:
    """`serve tokenizer|lam|dynamics`: their options live with the services (services/triton/cli.py)."""
    from services.triton.cli import register as register_model_services

    register_model_services(serve_sub)


def _register_stack(serve_sub: argparse._SubParsersAction) -> None:
    stack = serve_sub.add_parser(
        "stack", help="one world behind a gateway: the three Triton model services plus the gateway (backend triton)",
        description="Starts the tokenizer, lam and dynamics Triton services of one world, then the gateway pointed "
        "at them; SIGTERM or SIGINT stops all of them. Default ports: gateway gRPC 50051 and metrics 9090; "
        "services from --service-base-port B=8000, each http/grpc/metrics: dynamics B..B+2 (grpc 8001), "
        "tokenizer B+10..B+12 (grpc 8011), lam B+20..B+22 (grpc 8021). Other gateway settings: GENIE_GATEWAY_*. "
        "A child that dies is restarted (with backoff, logged, counted in genie_service_restarts_total); "
        "the stack runs until SIGTERM/SIGINT.")
    stack.add_argument("--world", type=Path, required=True, help="trained world checkpoint directory")
    stack.add_argument("--model-name", default="world", help="the world's model name in the gateway")
    stack.add_argument("--port", type=int, default=50051, help="gateway gRPC port")
    stack.add_argument("--metrics-port", type=int, default=9090, help="gateway Prometheus port (0: a free one)")
    stack.add_argument("--service-base-port", type=int, default=8000,
                       help="first port of the services' fixed layout (0: free loopback ports for each)")
    stack.add_argument("--service-address", default="127.0.0.1", help="interface the model services bind")
    stack.add_argument("--max-worlds", type=int, default=256, help="world caches kept per model service")
    stack.add_argument("--max-queue-delay-us", type=int, default=500, help="how long a step waits to share a batch")
    stack.add_argument("--device", default="cpu", help="torch device of the model services (cpu, cuda, cuda:1)")
    stack.add_argument("--stack-metrics-port", type=int, default=9091,
                       help="Prometheus port of the stack itself: genie_service_restarts_total (0: a free one)")
    stack.add_argument("--restart-backoff-s", type=float, default=1.0,
                       help="wait before restarting a child that died; doubles per quick failure, up to 30 s")
    stack.set_defaults(handler=_serve_stack)


def _serve_stack(args: argparse.Namespace) -> None:
    from services.logs import configure_logging
    from services.triton.stack import ServiceOptions, ServiceStack, stack_ports
    from services.triton.supervisor import RestartPolicy, run_stack

    if not args.world.is_dir():  # fail before three services each fail to load it
        raise FileNotFoundError(f"no world checkpoint directory at {args.world}")
    configure_logging("INFO")
    options = ServiceOptions(address=args.service_address, max_worlds=args.max_worlds,
                             max_queue_delay_us=args.max_queue_delay_us, device=args.device)
    stack = ServiceStack(args.world, args.model_name, options, stack_ports(args.service_base_port))
    gateway_args = ["--backend", "triton", "--port", str(args.port), "--metrics-port", str(args.metrics_port)]
    policy = RestartPolicy(initial_backoff_s=args.restart_backoff_s)
    code = run_stack(stack, gateway_args, args.stack_metrics_port, policy)
    if code:
        raise SystemExit(code)


def gateway_settings_from(args: argparse.Namespace):
    from services.settings import GatewaySettings

    settings = GatewaySettings()
    overrides = {name: value for name, value in (("port", args.port), ("metrics_port", args.metrics_port),
                                                 ("backend", args.backend)) if value is not None}
    if args.model:
        pairs = [spec.split("=", 1) for spec in args.model]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"--model takes NAME=DIR, got {args.model}")
        overrides["models"] = settings.models | dict(pairs)
    return settings.model_copy(update=overrides) if overrides else settings


def _serve_gateway(args: argparse.Namespace) -> None:
    from services.gateway.server import serve
    from services.logs import configure_logging

    settings = gateway_settings_from(args)
    configure_logging(settings.log_level)
    serve(settings)


def action_list(text: str) -> list[int]:
    """--actions: "0,1,2" -> [0, 1, 2]; anything else is refused with the word at fault."""
    actions = []
    for word in (part.strip() for part in text.split(",")):
        if not word:
            continue
        if not word.isdigit():
            raise argparse.ArgumentTypeError(f"{word!r} is not an action: give latent action numbers (0, 1, ...) "
                                             f"separated by commas, e.g. 0,1,2")
        actions.append(int(word))
    return actions


def passes(text: str) -> int:
    """--maskgit-steps: a whole number of passes, 0 meaning the model's default."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of passes: give a whole number, 0 for the model's")
    return int(text)


@contextlib.contextmanager
def gateway_stub(args: argparse.Namespace) -> Iterator:
    """A WorldService stub for `genie client COMMAND`; a refusal or an unreadable file ends the command in one line
    (services/client.py cli_errors)."""
    from services.client import api_key_from, cli_errors, connect

    with cli_errors(f"genie client {args.client_command}"):
        channel, stub = connect(args.address, api_key_from(args.api_key_file), args.ca_file)
        with channel:
            yield stub


def _client_play(args: argparse.Namespace) -> None:
    from genie.v1 import world_pb2 as pb
    from services.client import play, save_frames

    sampling = pb.SamplingParams(seed=args.seed, num_maskgit_steps=args.maskgit_steps)
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.action_guidance is not None:
        sampling.action_guidance = args.action_guidance
    with gateway_stub(args) as stub:
        world, frames = play(stub, args.image, args.actions, args.model, sampling)
    gif = save_frames(frames, args.out)
    print(json.dumps({"frames": len(frames), "gif": str(gif), "model": world.model,
                      "model_version": world.model_version, "sampling": proto_json(world.sampling)}))


def _client_models(args: argparse.Namespace) -> None:
    from genie.v1 import world_pb2 as pb

    with gateway_stub(args) as stub:
        listed = stub.ListModels(pb.ListModelsRequest())
    print(json.dumps(proto_json(listed), indent=2))


def proto_json(message) -> dict:
    """A genie.v1 message in protobuf's JSON mapping (field names as in the .proto, zero values shown, 64-bit
    integers as strings), as backend teams see it from any other gRPC client."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def main(argv: list[str] | None = None) -> None:
    """Stand-alone runner (`python -m services.cli ...`, how `genie serve stack` starts its gateway) until the genie
    CLI dispatches to register()."""
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="genie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
