"""The set-up leaves an environment where transformers and vLLM import side by side."""

import importlib.util
import subprocess
import sys


def test_transformers_and_vllm_import_together():
    code = "import torch, transformers, vllm; print(torch.__version__, transformers.__version__, vllm.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_v, _, vllm_v = proc.stdout.split()[-3:]
    assert vllm_v == "0.32.0"
    assert torch_v.startswith("2.13.0")


def test_no_broken_torchvision():
    # PyPI's torchvision next to the CPU torch breaks `import transformers`; setup removes it.
    if importlib.util.find_spec("torchvision") is not None:
        proc = subprocess.run([sys.executable, "-c", "import torchvision.ops"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_console_command_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "mod_serve.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("serve", "convert", "bench", "train", "eval"):
        assert f"  {name}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "mod_serve.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "frobnicate" in bad.stderr
