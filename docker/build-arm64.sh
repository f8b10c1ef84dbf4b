#!/usr/bin/env bash
# Cross-build the Jetson images on an x86 machine with buildx and qemu.
#   docker/build-arm64.sh            # all three JetPack lines
#   docker/build-arm64.sh jp62       # one; tags tvswitch:jp62
#   PUSH=registry.example/tvswitch docker/build-arm64.sh jp51   # push instead of load
# nvcc runs under emulation in the build stages: expect tens of minutes per image.
set -euo pipefail
cd "$(dirname "$0")/.."
lines=("$@")
[ ${#lines[@]} -eq 0 ] && lines=(jp46 jp51 jp62)
if ! docker buildx inspect tvswitch-arm64 >/dev/null 2>&1; then
    docker run --privileged --rm tonistiigi/binfmt --install arm64
    docker buildx create --name tvswitch-arm64 --driver docker-container >/dev/null
fi
for line in "${lines[@]}"; do
    file="docker/jetson-${line}.Dockerfile"
    [ -f "$file" ] || { echo "no $file (choose jp46, jp51 or jp62)" >&2; exit 2; }
    if [ -n "${PUSH:-}" ]; then
        out=(--push -t "${PUSH}:${line}")
    else
        out=(--load -t "tvswitch:${line}")
    fi
    docker buildx build --builder tvswitch-arm64 --platform linux/arm64 -f "$file" "${out[@]}" .
done
