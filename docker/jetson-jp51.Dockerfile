# syntax=docker/dockerfile:1
# tvswitch for JetPack 5.1 (L4T R35: Xavier NX/AGX, and Orin on JetPack 5). See docker/README.md.
# Python 3.8 (JetPack's own), TensorRT 8.5 (refit from host memory), CUDA 11.4 kernels
# compiled here into fatbins for sm_72/sm_87, and cuda-python 11.8 for the driver API
# (cuda-bindings 12 needs a CUDA 12 driver, which JetPack 5 does not have).
ARG L4T_TAG=r35.4.1

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
         /usr/local/cuda/bin/nvcc -fatbin -O3 \
           -gencode arch=compute_72,code=sm_72 -gencode arch=compute_87,code=sm_87 \
           -o "/opt/tvswitch/fatbin/$(basename "$cu" .cu).fatbin" "$cu"; \
       done
# --system-site-packages: JetPack's TensorRT bindings live in the system python3.8
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade "pip<25" \
    && /opt/venv/bin/pip install --no-cache-dir ".[onnx]" "cuda-python==11.8.*"

FROM nvcr.io/nvidia/l4t-jetpack:${L4T_TAG} AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tvswitch/fatbin /opt/tvswitch/fatbin
COPY examples/ /opt/tvswitch/examples/
ENV PATH=/opt/venv/bin:$PATH
CMD ["tvswitch", "doctor"]
