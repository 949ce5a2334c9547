# pptk installed from a wheel, non-editable, as the Docker image installs it: the shipped configs come with it.
"""The wheel is built from a copy of what the Dockerfile copies (pyproject.toml, pptk/, ds_configs/), installed with
--no-deps into a fresh venv, and run from a folder outside the repository. The venv sees the pinned dependency
stack through a .pth file naming this venv's site-packages (a .pth line adds a folder to sys.path without running
the .pth files inside it, so this venv's editable pptk stays invisible): reinstalling torch would take minutes and a
package index, and the question here is what pptk's own wheel carries.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import DEMO_CACHE, ROOT, free_port

pytestmark = pytest.mark.dist


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, a working folder outside the repository with a copy of recipes/, as in the image's /workspace)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("pptk", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp / "dist").glob("pptk-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp / "workspace"
    shutil.copytree(ROOT / "recipes", work / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    return venv, work


def test_the_installed_package_is_the_wheel_and_carries_its_configs(installed):
    venv, work = installed
    probe = (
        "import json, pptk; from pptk.training.ds_config import default_ds_config, shipped_config; "
        "print(json.dumps([pptk.__file__, str(shipped_config('bf16')), str(default_ds_config('cpu'))]))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        cwd=work,
        env=_env(venv),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    package, bf16, default = (Path(p) for p in json.loads(out.stdout.splitlines()[-1]))
    assert venv in package.parents and ROOT not in package.parents
    assert bf16.is_file() and bf16.name == "pipe_zero1_bf16.json" and venv in bf16.parents
    assert default.name == "pipe_zero1_cpu.json" and default.is_file()


def test_pptk_verify_runs_from_the_wheel_with_the_shipped_bf16_config(installed):
    venv, work = installed
    out = subprocess.run(
        [str(venv / "bin" / "pptk"), "verify", "gpt2", "--pp", "2", "--precision", "bf16", "--json"],
        capture_output=True,
        text=True,
        cwd=work,
        env=_env(venv),
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["passed"] and result["precision"] == "bf16" and result["pp"] == 2


def test_a_recipe_with_the_default_ds_config_runs_from_the_wheel(installed, tmp_path):
    """pptk/train.py still computes site-packages/ds_configs/pipe_zero1_cpu.json; load_ds_config finds that name in
    the package (the trainer should call pptk.training.ds_config.default_ds_config() instead)."""
    venv, work = installed
    run = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "recipes/gpt_pretrain.py",
            "--demo",
            "--max-steps",
            "4",
            "--eval-every",
            "1000",
            "--save-every",
            "4",
            "--micro-batch-size",
            "2",
            "--data-cache",  # the demo's tokenizer and set, prepared once per session
            str(DEMO_CACHE),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=_env(venv),
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
