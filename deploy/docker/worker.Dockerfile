# syntax=docker/dockerfile:1.7
# A training worker: `genie worker` (Celery; GENIE_WORKER_*, GENIE_STORE_*), metrics :9092.
# TORCH_INDEX picks the torch build: the CPU index by default; for GPUs pass a CUDA index, e.g.
#   docker build -f deploy/docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# (CUDA wheels carry their CUDA libraries; the host needs only the driver and the NVIDIA container toolkit.)
FROM python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/genie
COPY requirements.txt .
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple -r requirements.txt
COPY pyproject.toml README.md ./
COPY genie_models genie_models
COPY services services
COPY protos protos
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home genie && install -d -o 10001 /var/lib/genie
COPY deploy/docker/healthcheck.py /usr/local/bin/genie-healthcheck
USER 10001
ENV GENIE_WORKER_SCRATCH_DIR=/var/lib/genie/worker GENIE_STORE_CACHE_DIR=/var/lib/genie/model-cache
EXPOSE 9092
# Alive = its metrics endpoint answers (the Celery consumer and the metrics server share the process).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/genie-healthcheck", "http", "http://127.0.0.1:9092/metrics"]
ENTRYPOINT ["genie"]
CMD ["worker"]
