# syntax=docker/dockerfile:1
# tvswitch for JetPack 5.1 (L4T R35: Xavier NX/AGX, and Orin on JetPack 5). See docker/README.md.
# Python 3.8 (JetPack's own), TensorRT 8.5 (refit from host memory), cuda-python 11.8 for
# the driver API: the cuda extra picks it on Python 3.8 (cuda-bindings 12 needs a CUDA 12
# driver, which JetPack 5 does not have, and has no Python 3.8 wheels). NVRTC is JetPack's
# 11.4 (cuda-nvrtc-11-4 below), not the nvrtc12 extra.
# The kernels are compiled here by tvswitch.kernels.build_fatbins with CUDA 11.4's nvcc
# (sm_72, sm_87) into the folder the runtime's loader reads ($TVSWITCH_KERNELS); NVRTC
# 11.4 in the runtime stage compiles for any other GPU.
ARG L4T_TAG=r35.4.1
ARG L4T_APT=r35.4

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
# --system-site-packages: JetPack's TensorRT bindings live in the system python3.8
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx,cuda]"
RUN /opt/venv/bin/python -m tvswitch.kernels.build_fatbins --compiler nvcc --nvcc /usr/local/cuda/bin/nvcc \
        --arch sm_72,sm_87 --out /opt/tvswitch/kernels

# Slim runtime: l4t-base r35 holds no CUDA (from L4T R34 on, NVIDIA's containers no longer
# mount CUDA or TensorRT from the host), so the stage adds only the run-time packages of
# JetPack 5.1 from NVIDIA's Jetson apt repository instead of the multi-GB l4t-jetpack.
FROM nvcr.io/nvidia/l4t-base:${L4T_TAG} AS runtime
ARG L4T_APT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://repo.download.nvidia.com/jetson/jetson-ota-public.asc \
       | gpg --dearmor -o /usr/share/keyrings/jetson.gpg \
    && printf 'deb [signed-by=/usr/share/keyrings/jetson.gpg] https://repo.download.nvidia.com/jetson/common %s main\n' "$L4T_APT" \
       > /etc/apt/sources.list.d/jetson.list \
    && apt-get update && apt-get install -y --no-install-recommends \
        python3 libgomp1 cuda-cudart-11-4 cuda-nvrtc-11-4 libcudnn8 \
        libnvinfer8 libnvinfer-plugin8 libnvonnxparsers8 python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvswitch/kernels /opt/tvswitch/kernels
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH TVSWITCH_KERNELS=/opt/tvswitch/kernels
CMD ["tvswitch", "doctor"]
