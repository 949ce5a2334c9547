# `pptk env`: the report matches what is installed, and every disagreement with constraints.txt fails with its fix.
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

import pytest

from pptk.cli import env as env_cli
from pptk.cli.env import env_main
from pptk.launch import env_report as pptk_env
from pptk.launch.env_report import (
    CORE_PACKAGES,
    EXIT_MISMATCH,
    EXIT_NO_CONSTRAINTS,
    EXIT_OK,
    check_runtime,
    collect_env,
    compare_with_pins,
    find_constraints,
    parse_topology,
    read_pins,
    versions_equal,
)

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"

# `nvidia-smi topo -m` of an 8-GPU NVLink node with two InfiniBand NICs (the header is underlined on a tty).
TOPO_NVLINK = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\t"
    "GPU NUMA ID\x1b[0m\n"
    + "".join(
        f"GPU{i}\t"
        + "\t".join(" X " if j == i else "NV18" for j in range(8))
        + f"\t{'PIX' if i < 4 else 'SYS'}\t{'SYS' if i < 4 else 'PIX'}\t{'0-55' if i < 4 else '56-111'}\t"
        + f"{0 if i < 4 else 1}\t\tN/A\n"
        for i in range(8)
    )
    + "NIC0\tPIX\tPIX\tPIX\tPIX\tSYS\tSYS\tSYS\tSYS\t X \tSYS\n"
    + "NIC1\tSYS\tSYS\tSYS\tSYS\tPIX\tPIX\tPIX\tPIX\tSYS\t X \n\n"
    "Legend:\n\n  X    = Self\n  SYS  = Connection traversing PCIe as well as the SMP interconnect\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n\nNIC Legend:\n\n  NIC0: mlx5_0\n  NIC1: mlx5_1\n"
)
TOPO_PCIE = (
    "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tPHB\t0-15\t0\t\tN/A\n"
    "GPU1\tPHB\t X \t0-15\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n"
)
TOPO_ONE_GPU = "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-15\t0\t\tN/A\n"


@pytest.fixture(autouse=True)
def _no_image_expectations(monkeypatch):
    # Inside the pptk image these are set; the unit tests choose their own.
    monkeypatch.delenv("PPTK_EXPECT_TORCH_CUDA", raising=False)
    monkeypatch.delenv("PPTK_CONSTRAINTS", raising=False)


@pytest.fixture(scope="module")
def collected() -> dict:
    return collect_env()


def _write_constraints(path: Path, **changes: str) -> Path:
    lines = []
    for line in CONSTRAINTS.read_text().splitlines():
        name = line.split("==", 1)[0]
        lines.append(f"{name}=={changes[name]}" if name in changes else line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_collect_env_reports_the_installed_versions(collected):
    import deepspeed
    import torch

    for name in CORE_PACKAGES:
        assert collected["packages"][name] == importlib.metadata.version(name), name
    assert collected["python"]["version"] == platform.python_version()
    assert collected["torch"]["version"] == torch.__version__
    assert collected["torch"]["cuda_build"] == torch.version.cuda
    assert collected["deepspeed"]["version"] == deepspeed.__version__
    assert {"fused_adam", "cpu_adam"} <= set(collected["deepspeed"]["ops"])
    json.dumps(collected)  # --json must be able to print all of it


def test_this_checkout_matches_its_own_pins(capsys):
    assert env_main(json_output=True, quiet=False, constraints=CONSTRAINTS) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    assert report["constraints"] == str(CONSTRAINTS)


def test_the_readable_report_names_every_core_package(capsys):
    assert env_main(json_output=False, quiet=False, constraints=None) == EXIT_OK
    out = capsys.readouterr().out
    for name in CORE_PACKAGES:
        assert f"\n{name} " in out
    assert "DeepSpeed" in out and "fused_adam" in out
    assert out.rstrip().endswith("OK: the stack matches constraints.txt")


def test_a_changed_pin_fails_with_the_package_both_versions_and_the_fix(tmp_path, capsys):
    installed = importlib.metadata.version("deepspeed")
    constraints = _write_constraints(tmp_path / "constraints.txt", deepspeed="0.19.7")
    assert env_main(json_output=False, quiet=True, constraints=constraints) == EXIT_MISMATCH
    out = capsys.readouterr().out
    assert f"deepspeed {installed} is installed but constraints.txt pins 0.19.7" in out
    assert "pip install -c constraints.txt deepspeed==0.19.7" in out
    assert "rebuild" in out


def test_json_output_carries_the_mismatch(tmp_path, capsys):
    constraints = _write_constraints(tmp_path / "constraints.txt", transformers="5.22.0")
    assert env_main(json_output=True, quiet=False, constraints=constraints) == EXIT_MISMATCH
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    assert [p for p in report["problems"] if p.startswith("transformers ")]


@pytest.mark.parametrize(
    ("installed", "pinned", "equal"),
    [
        ("2.13.0", "2.13.0", True),
        ("2.13.0+cpu", "2.13.0", True),
        ("2.13.0+cu130", "2.13.0", True),
        ("2.13", "2.13.0", True),
        ("2.13.1", "2.13.0", False),
        ("2.13.0+cpu", "2.13.0+cu130", False),
        ("2.13.0+cu130", "2.13.0+cu130", True),
    ],
)
def test_local_version_labels_compare_equal_to_the_base_version(installed, pinned, equal):
    assert versions_equal(installed, pinned) is equal


def test_compare_with_pins_accepts_cuda_and_cpu_builds_and_flags_the_rest():
    env = {"packages": {"torch": "2.13.0+cu130", "deepspeed": "0.19.8", "wandb": None, "numpy": "2.4.6"}}
    pins = {"torch": "2.13.0", "deepspeed": "0.19.9", "wandb": "0.31.0"}
    problems = compare_with_pins(env, pins)
    assert len(problems) == 2
    assert problems[0].startswith("deepspeed 0.19.8 is installed but constraints.txt pins 0.19.9")
    assert problems[1].startswith("wandb is not installed; constraints.txt pins 0.31.0")
    env["packages"]["torch"] = "2.13.0+cpu"
    assert len(compare_with_pins(env, pins)) == 2


def test_read_pins_normalises_names_and_skips_everything_else(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(
        "# comment\n\n-r other.txt\n--index-url https://example.invalid\nhuggingface_hub==2.4.0\n"
        "Jinja2==3.1.6  # inline\nzope.interface==7.0 ; python_version >= '3.11'\nloose>=1.0\n"
    )
    assert read_pins(path) == {"huggingface-hub": "2.4.0", "jinja2": "3.1.6", "zope-interface": "7.0"}
    pins = read_pins(CONSTRAINTS)
    assert pins["torch"] and pins["deepspeed"] and pins["typing-extensions"]


def test_missing_constraints_exits_2_and_says_where_it_looked(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope.txt"
    assert env_main(json_output=False, quiet=False, constraints=missing) == EXIT_NO_CONSTRAINTS
    assert str(missing) in capsys.readouterr().err

    monkeypatch.setenv("PPTK_CONSTRAINTS", str(missing))
    assert env_main(json_output=True, quiet=False, constraints=None) == EXIT_NO_CONSTRAINTS
    assert f"PPTK_CONSTRAINTS={missing}" in capsys.readouterr().err

    # An installed (non-checkout) pptk with nothing configured.
    monkeypatch.delenv("PPTK_CONSTRAINTS")
    monkeypatch.setattr(pptk_env, "REPO_CONSTRAINTS", tmp_path / "site-packages" / "constraints.txt")
    assert env_main(json_output=False, quiet=True, constraints=None) == EXIT_NO_CONSTRAINTS
    err = capsys.readouterr().err
    assert "--constraints PATH" in err and "PPTK_CONSTRAINTS" in err


def test_an_explicit_path_beats_the_environment_which_beats_the_checkout(tmp_path, monkeypatch):
    explicit = _write_constraints(tmp_path / "explicit.txt")
    from_env = _write_constraints(tmp_path / "from_env.txt")
    assert find_constraints(None) == CONSTRAINTS
    monkeypatch.setenv("PPTK_CONSTRAINTS", str(from_env))
    assert find_constraints(None) == from_env
    assert find_constraints(explicit) == explicit


def test_topology_summaries():
    nvlink = parse_topology(TOPO_NVLINK)
    assert len(nvlink["links"]) == 28 and set(nvlink["links"].values()) == {"NV18"}
    assert nvlink["kind"] == "NVLink" and nvlink["nics"] == ["mlx5_0", "mlx5_1"]
    pcie = parse_topology(TOPO_PCIE)
    assert pcie["links"] == {"GPU0-GPU1": "PHB"} and pcie["kind"] == "PCIe" and pcie["nics"] == []
    assert parse_topology(TOPO_ONE_GPU)["kind"] == "single GPU"
    assert parse_topology("NVML error")["kind"] == "unknown"


def test_a_gpu_node_seen_through_nvidia_smi(monkeypatch, capsys):
    """nvidia-smi output (a sample in its format) feeds the report; torch here is a CPU build, so that fails."""
    query = "".join(f"{i}, NVIDIA H100 80GB HBM3, 580.65.06, 81559, 00000000:{i + 0x18:02X}:00.0\n" for i in range(8))
    real_run = pptk_env._run

    def fake_run(argv):
        if argv[:2] == ["nvidia-smi", "topo"]:
            return TOPO_NVLINK
        return query if argv[0] == "nvidia-smi" else real_run(argv)

    monkeypatch.setattr(pptk_env, "_run", fake_run)
    cpu_torch = pptk_env._torch_info()["cuda_build"] is None
    code = env_main(json_output=False, quiet=False, constraints=CONSTRAINTS)
    out = capsys.readouterr().out
    assert "nvidia-smi    8 GPU(s), driver 580.65.06" in out
    assert "Interconnect  NVLink between every GPU pair (NV18)" in out and "NICs          mlx5_0, mlx5_1" in out
    if cpu_torch:
        assert code == EXIT_MISMATCH and "is a CPU-only build" in out


def _env(prebuilt: bool = True, **torch_fields) -> dict:
    torch_env = {"version": "2.13.0+cu130", "cuda_build": "13.0", "cuda_available": True, "device_count": 8}
    torch_env.update(torch_fields)
    return {
        "python": {"version": "3.11.18", "requires": "<3.12,>=3.11"},
        "torch": torch_env,
        "nvidia_smi": {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver": "575.57.08"}]},
        "deepspeed": {
            "ops": {"fused_adam": {"prebuilt": prebuilt, "compatible": True}},
            "ops_built_with": {"torch": "2.13", "cuda": "13.0"},
        },
    }


def test_runtime_checks_catch_driver_cpu_torch_wrong_build_and_stale_ops(monkeypatch):
    pins = {"torch": "2.13.0"}
    assert check_runtime(_env(), pins) == []

    [problem] = check_runtime(_env(cuda_available=False), pins)
    assert "driver 575.57.08" in problem and "needs driver 580 or newer" in problem

    [problem] = check_runtime(_env(prebuilt=False, version="2.13.0+cpu", cuda_build=None, cuda_available=False), pins)
    assert "CPU-only build" in problem

    monkeypatch.setenv("PPTK_EXPECT_TORCH_CUDA", "cu130")
    # A cu128 torch swapped into the image: wrong build, and the prebuilt ops no longer match it.
    wrong_build, stale_ops = check_runtime(_env(version="2.13.0+cu128", cuda_build="12.8"), pins)
    assert "cu128 build but this image expects cu130" in wrong_build and "torch==2.13.0+cu130" in wrong_build
    assert "compiled with torch 2.13 / CUDA 13.0 but torch 2.13 / CUDA 12.8" in stale_ops
    monkeypatch.delenv("PPTK_EXPECT_TORCH_CUDA")

    stale = _env()
    stale["deepspeed"]["ops_built_with"] = {"torch": "2.12", "cuda": "13.0"}
    [problem] = check_runtime(stale, pins)
    assert "compiled with torch 2.12" in problem and "fail to load" in problem

    old_python = _env()
    old_python["python"]["version"] = "3.12.3"
    [problem] = check_runtime(old_python, pins)
    assert "Python 3.12.3 does not satisfy" in problem


def test_secrets_are_reported_as_set_not_shown(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    found = pptk_env._env_vars()
    assert found["WANDB_API_KEY"] == "<set>" and found["NCCL_DEBUG"] == "WARN"


def test_cli_hooks_parse_the_documented_options(tmp_path):
    parser = argparse.ArgumentParser(prog="pptk env")
    env_cli.add_arguments(parser)
    args = parser.parse_args(["--json", "--quiet", "--constraints", str(tmp_path / "x.txt")])
    assert args.json and args.quiet and args.constraints == tmp_path / "x.txt"
    assert env_cli.main(args) == EXIT_NO_CONSTRAINTS
