# syntax=docker/dockerfile:1
# tvswitch's CI installs in an image: the same pip installs, in the same order, with the
# same extras, then the same pytest command as .ci/run (README's test command).
# One difference, on purpose: torch comes from PyTorch's CPU index, where CI's machines
# take a local CPU wheel of the same version (see docker/README.md).
# tests/jetson/test_docker.py fails when this file and .ci/run drift apart either way.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir -e '.[onnx,torch,cuda,nvrtc12,test]'
CMD ["pytest", "-q"]
