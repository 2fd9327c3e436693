# syntax=docker/dockerfile:1.7
# A Triton model service on CPU: `genie serve tokenizer|lam|dynamics --checkpoint DIR --model-name NAME`.
# PyTriton (nvidia-pytriton) bundles tritonserver and its Python backend; ports: HTTP :8000, gRPC :8001,
# metrics :8002 (nv_*). Build from the repository root:
#   docker build -f deploy/docker/model-service.cpu.Dockerfile -t genie-model-service:cpu .
# Run with shm >= 256 MB (each Python-backend model instance needs >= 64 MB of /dev/shm).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/genie
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        -r requirements.txt
COPY pyproject.toml README.md ./
COPY genie_models genie_models
COPY services services
COPY protos protos
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home genie && install -d -o 10001 /tmp/pytriton
COPY deploy/docker/healthcheck.py /usr/local/bin/genie-healthcheck
USER 10001
EXPOSE 8000 8001 8002
# Ready = tritonserver up and every model of this service loaded (Triton's own readiness endpoint).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/genie-healthcheck", "http", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["genie"]
CMD ["serve", "dynamics", "--help"]
