# syntax=docker/dockerfile:1
# tvswitch for JetPack 4.6 (L4T R32.7: Jetson Nano, TX2). See docker/README.md.
# JetPack 4 ships Python 3.6; tvswitch needs 3.8, which Ubuntu 18.04's archive has.
# Runs: CPU rebuild (C, OpenMP) + ONNX Runtime CPU. The CUDA kernels are compiled here
# with CUDA 10.2's nvcc into fatbins for sm_53/sm_62 (JetPack 4 has no cuda-python).
ARG L4T_TAG=r32.7.1

FROM nvcr.io/nvidia/l4t-base:${L4T_TAG} AS build
# l4t-base r32 mounts CUDA from the host only at run time: the build stage installs
# nvcc from the L4T apt repository the image already lists.
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cuda-nvcc-10-2 cuda-cudart-dev-10-2 \
        python3.8 python3.8-dev python3.8-venv \
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
         /usr/local/cuda-10.2/bin/nvcc -fatbin -O3 \
           -gencode arch=compute_53,code=sm_53 -gencode arch=compute_62,code=sm_62 \
           -o "/opt/tvswitch/fatbin/$(basename "$cu" .cu).fatbin" "$cu"; \
       done
RUN python3.8 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx]"

FROM nvcr.io/nvidia/l4t-base:${L4T_TAG} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends python3.8 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvswitch/fatbin /opt/tvswitch/fatbin
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH
CMD ["tvswitch", "doctor"]
