# syntax=docker/dockerfile:1
# tvswitch for JetPack 6.2 (L4T R36.4: Orin Nano/NX/AGX). See docker/README.md.
# Python 3.10, TensorRT 10.3 (refit from device memory), CUDA kernels through
# cuda.bindings + NVRTC at run time; fatbins for sm_87 are built too for loaders that
# skip NVRTC. The runtime stage is ubuntu:22.04 plus only the L4T packages it needs.
ARG L4T_TAG=r36.4.0

FROM nvcr.io/nvidia/l4t-jetpack:${L4T_TAG} AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tvswitch/ tvswitch/
COPY jetson/ jetson/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY export/ export/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN mkdir -p /opt/tvswitch/fatbin \
    && shopt -s nullglob \
    && for cu in kernels/*.cu; do \
         /usr/local/cuda/bin/nvcc -fatbin -O3 -gencode arch=compute_87,code=sm_87 \
           -o "/opt/tvswitch/fatbin/$(basename "$cu" .cu).fatbin" "$cu"; \
       done
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx,cuda,nvrtc12]"

FROM ubuntu:22.04 AS runtime
ARG L4T_APT=r36.4
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://repo.download.nvidia.com/jetson/jetson-ota-public.asc \
       | gpg --dearmor -o /usr/share/keyrings/jetson.gpg \
    && printf 'deb [signed-by=/usr/share/keyrings/jetson.gpg] https://repo.download.nvidia.com/jetson/common %s main\n' "$L4T_APT" \
       > /etc/apt/sources.list.d/jetson.list \
    && apt-get update && apt-get install -y --no-install-recommends \
        python3 libgomp1 cuda-cudart-12-6 libnvinfer10 libnvinfer-plugin10 libnvonnxparsers10 python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvswitch/fatbin /opt/tvswitch/fatbin
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH
CMD ["tvswitch", "doctor"]
