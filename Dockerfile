# latentserve image. CPU by default:
#   docker build -t latentserve .
# GPU hosts (CUDA 13 base, the `gpu` extra: onnxruntime-gpu + TensorRT, CUDA torch):
#   docker build --target gpu -t latentserve:gpu .
# One image runs every role: `python -m service.api` (default) or `python -m service.worker`.

# The project's files, once, for both targets.
FROM scratch AS source
COPY pyproject.toml README.md /app/
COPY service /app/service
COPY engines /app/engines
COPY export /app/export
COPY training /app/training
COPY models /app/models

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 LATENTSERVE_HOST=0.0.0.0 LATENTSERVE_DEVICE=cuda \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.13.0
COPY --from=source /app /app
# `gpu`, never `cpu`: onnxruntime and onnxruntime-gpu provide the same module.
RUN pip install '.[gpu]'
RUN useradd --uid 10001 --no-create-home latentserve \
    && mkdir -p /var/cache/latentserve && chown latentserve /var/cache/latentserve
ENV LATENTSERVE_ENGINE_CACHE=/var/cache/latentserve/engines
USER latentserve
EXPOSE 8000 9101
CMD ["python", "-m", "service.worker"]

# Last, so a plain `docker build` (no --target) gives the CPU image.
FROM python:3.11-slim-bookworm AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 LATENTSERVE_HOST=0.0.0.0
WORKDIR /app
# The CPU build of torch from PyTorch's own index (PyPI's Linux wheel is the CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=source /app /app
RUN pip install '.[cpu]'
RUN useradd --uid 10001 --no-create-home latentserve \
    && mkdir -p /var/cache/latentserve && chown latentserve /var/cache/latentserve
ENV LATENTSERVE_ENGINE_CACHE=/var/cache/latentserve/engines
USER latentserve
EXPOSE 8000 9101
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["python", "-m", "service.api"]
