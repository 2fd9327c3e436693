# syntax=docker/dockerfile:1.7
# A Triton model service on an NVIDIA GPU: same command as the CPU variant plus `--device cuda`.
# CUDA runtime base (Ubuntu 22.04, glibc 2.35 as PyTriton's tritonserver needs); Python 3.11 from deadsnakes
# with its libpython3.11.so (the Python-backend stub links it; services/triton/serve.py puts this
# interpreter's LIBDIR first on LD_LIBRARY_PATH). torch==2.13.0 from PyPI is the CUDA build.
# Build from the repository root:
#   docker build -f deploy/docker/model-service.gpu.Dockerfile -t genie-model-service:gpu .
# Run with the NVIDIA container toolkit (--gpus all) and shm >= 1 GB.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/genie
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY genie_models genie_models
COPY services services
COPY protos protos
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home genie && install -d -o 10001 /tmp/pytriton
COPY deploy/docker/healthcheck.py /usr/local/bin/genie-healthcheck
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/genie-healthcheck", "http", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["genie"]
CMD ["serve", "dynamics", "--help"]
