# syntax=docker/dockerfile:1.7
# The session gateway: `genie serve gateway` (GENIE_GATEWAY_*), gRPC :50051, metrics :9090.
# Build from the repository root: docker build -f deploy/docker/gateway.Dockerfile -t genie-gateway .
#
# CPU torch is installed although the gateway runs the `triton` backend: services/gateway/gateway.py imports
# genie_models.world (prompt preparation) and genie_models/__init__.py imports torch, and the `genie` command
# itself is genie_models.cli. Until that import is split out, the gateway image carries CPU torch (~200 MB).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/genie
COPY requirements.txt .
# torch==2.13.0 from the CPU index resolves to 2.13.0+cpu (no CUDA libraries in the gateway).
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        -r requirements.txt
COPY pyproject.toml README.md ./
COPY genie_models genie_models
COPY services services
COPY protos protos
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home genie
COPY deploy/docker/healthcheck.py /usr/local/bin/genie-healthcheck
USER 10001
ENV GENIE_GATEWAY_HOST=0.0.0.0
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/genie-healthcheck", "grpc", "127.0.0.1:50051"]
ENTRYPOINT ["genie"]
CMD ["serve", "gateway"]
