# syntax=docker/dockerfile:1
# tvswitch for JetPack 6.2 (L4T R36.4: Orin Nano/NX/AGX; JetPack 6.1 is the same R36.4
# stack). See docker/README.md. Python 3.10, TensorRT 10.3 (refit from device memory),
# CUDA kernels through cuda.bindings 12 + NVRTC 12 at run time; build_fatbins compiles
# them for sm_87 here too, into the folder the loader reads first ($TVSWITCH_KERNELS), so
# the first switch needs no compile. The runtime stage is ubuntu:22.04 plus only the L4T
# packages it needs (NVIDIA publishes no l4t-base for R36).
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
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx,cuda,nvrtc12]"
RUN /opt/venv/bin/python -m tvswitch.kernels.build_fatbins --compiler nvcc --nvcc /usr/local/cuda/bin/nvcc \
        --arch sm_87 --out /opt/tvswitch/kernels

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
COPY --from=build /opt/tvswitch/kernels /opt/tvswitch/kernels
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH TVSWITCH_KERNELS=/opt/tvswitch/kernels
CMD ["tvswitch", "doctor"]
