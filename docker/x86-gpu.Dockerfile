# syntax=docker/dockerfile:1
# tvswitch development on an x86 NVIDIA GPU: CUDA 12.6 toolkit, TensorRT 10 and
# onnxruntime-gpu from PyPI, the package editable. Start with --gpus all.
# The cudnn tag, not plain devel: onnxruntime-gpu's CUDA provider (1.19 and later, CUDA 12)
# links libcudnn.so.9, which the plain devel image lacks; this one has cuDNN 9 for CUDA 12.
FROM nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
# onnxruntime-gpu replaces the onnx extra's CPU onnxruntime (both own the module)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir torch==2.13.0 onnx "onnxruntime-gpu>=1.19" "tensorrt-cu12>=10.3,<11" \
    && pip install --no-cache-dir -e '.[torch,cuda,nvrtc12,test]'
CMD ["tvswitch", "doctor"]
