"""Regenerates the Python gRPC stubs of protos/genie/v1/*.proto into protos/ (or another directory).

Run `python protos/generate.py`; tests/services/test_protos.py checks the committed stubs are current.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("genie/v1/world.proto", "genie/v1/jobs.proto")


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    for proto in PROTO_FILES:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted(p for proto in PROTO_FILES for p in (out_dir / proto).parent.glob("*_pb2*.py*"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)
