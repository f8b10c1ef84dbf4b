# syntax=docker/dockerfile:1
# tvswitch's CI environment: the same installs, in the same order, as .ci/run.
# tests/jetson/test_docker.py fails when this file and .ci/run drift apart.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir -e '.[onnx,torch,cuda,nvrtc12,test]'
CMD ["pytest", "-q"]
