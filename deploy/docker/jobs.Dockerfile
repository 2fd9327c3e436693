# syntax=docker/dockerfile:1.7
# The training-job API: `genie serve jobs` (GENIE_JOBS_*, GENIE_STORE_*), gRPC :50061, metrics :9091.
# It runs no model code, but the `genie` command is genie_models.cli, which imports torch: CPU torch.
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
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home genie
COPY deploy/docker/healthcheck.py /usr/local/bin/genie-healthcheck
USER 10001
EXPOSE 50061 9091
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/genie-healthcheck", "grpc", "127.0.0.1:50061"]
ENTRYPOINT ["genie"]
CMD ["serve", "jobs"]
