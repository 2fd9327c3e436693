# syntax=docker/dockerfile:1.7
# The session gateway: `genie serve gateway` (GENIE_GATEWAY_*), gRPC :50051, metrics :9090.
# Build from the repository root: docker build -f deploy/docker/gateway.Dockerfile -t genie-gateway .
#
# No torch: the gateway runs the `triton` backend and reaches models only through the Triton services;
# prompt preparation is genie_models.prompts (numpy + Pillow) and `genie` loads torch only for model commands
# (tests/services/test_gateway_torch_free.py). The pinned lock minus torch, the Triton server (model services
# only) and procgen (training data only). The `inprocess` backend needs torch: use the worker image for that.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/genie
COPY requirements.txt .
RUN grep -vE '^(torch|nvidia-pytriton|procgen-mirror|gym|gym3|gym-notices)==' requirements.txt > gateway-requirements.txt \
    && pip install -r gateway-requirements.txt \
    && ! pip show torch >/dev/null 2>&1
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
