# syntax=docker/dockerfile:1
# tvswitch for JetPack 4.6 (L4T R32.7: Jetson Nano, TX2). See docker/README.md.
# JetPack 4 ships Python 3.6; tvswitch needs 3.8, which Ubuntu 18.04's archive has.
# Runs: CPU rebuild (C, OpenMP) + ONNX Runtime CPU. The CUDA kernels are compiled here by
# tvswitch.kernels.build_fatbins with CUDA 10.2's nvcc (sm_53, sm_62) into the folder the
# runtime's loader reads ($TVSWITCH_KERNELS), and pycuda, built here against CUDA 10.2,
# loads them: JetPack 4 has no cuda-python.
ARG L4T_TAG=r32.7.1

FROM nvcr.io/nvidia/l4t-base:${L4T_TAG} AS build
# l4t-base r32 mounts CUDA from the host only at run time: the build stage installs
# nvcc, the runtime headers and the driver stub from the L4T apt repository the image lists.
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cuda-nvcc-10-2 cuda-cudart-dev-10-2 cuda-driver-dev-10-2 \
        python3.8 python3.8-dev python3.8-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tvswitch/ tvswitch/
COPY jetson/ jetson/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY export/ export/
ENV PATH=/usr/local/cuda-10.2/bin:$PATH CUDA_ROOT=/usr/local/cuda-10.2
# pycuda links libcuda.so from the toolkit's stubs; at run time the host's driver is mounted
RUN python3.8 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx]" \
    && LDFLAGS=-L/usr/local/cuda-10.2/lib64/stubs /opt/venv/bin/pip install --no-cache-dir "pycuda==2024.1.2"
RUN /opt/venv/bin/python -m tvswitch.kernels.build_fatbins --compiler nvcc --nvcc /usr/local/cuda-10.2/bin/nvcc \
        --arch sm_53,sm_62 --out /opt/tvswitch/kernels

FROM nvcr.io/nvidia/l4t-base:${L4T_TAG} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends python3.8 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvswitch/kernels /opt/tvswitch/kernels
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH TVSWITCH_KERNELS=/opt/tvswitch/kernels
CMD ["tvswitch", "doctor"]
