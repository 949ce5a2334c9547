# `pptk env`: what this machine runs (torch/CUDA/NCCL, DeepSpeed ops, GPUs and links) against constraints.txt.
"""Report the software stack and the GPUs, and compare the versions with the pins in constraints.txt.

Exit codes of :func:`env_main`: 0 everything matches, 1 a mismatch (each named with its fix), 2 no
constraints file to compare with. ``collect_env`` initialises CUDA when a GPU is present, so call it in a
command of its own, not in a process that forks workers afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from pptk.errors import PptkError

EXIT_OK, EXIT_MISMATCH, EXIT_NO_CONSTRAINTS = 0, 1, 2

# Packages whose versions are reported and must equal their pins (names as in constraints.txt, normalised).
CORE_PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "accelerate",
    "wandb",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "numpy",
)
# The DeepSpeed ops a pptk run may load: the optimizers DeepSpeed builds for Adam(W) and LAMB, and CPU
# Adam for optimizer offload.
PIPELINE_OPS = ("fused_adam", "cpu_adam", "fused_lamb")
ENV_VAR_PREFIXES = ("NCCL_", "TORCH_NCCL_", "WANDB_", "PPTK_")
ENV_VAR_NAMES = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# CUDA 13.x runs on driver branch 580 or newer (CUDA 12.x on 525 or newer).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525}
SMALL_SHM_BYTES = 1 << 30
NVIDIA_SMI_TIMEOUT_S = 20
REPO_CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def normalize_name(name: str) -> str:
    """PEP 503 name: `huggingface_hub`, `Huggingface-Hub` and `huggingface.hub` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(constraints_path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, keyed by normalised name; other lines are ignored."""
    try:
        text = Path(constraints_path).read_text()
    except OSError as err:
        raise PptkError(
            f"cannot read constraints file {constraints_path}: {err.strerror}. "
            "Pass --constraints PATH to an existing constraints.txt."
        ) from err
    pins = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].split(";", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s=]+)", line)
        if match:
            pins[normalize_name(match.group(1))] = match.group(2)
    return pins


def versions_equal(installed: str, pinned: str) -> bool:
    """True when `installed` satisfies `==pinned`: a local label (`+cpu`, `+cu130`) is ignored unless pinned."""
    try:
        have, want = Version(installed), Version(pinned)
    except InvalidVersion:
        return installed == pinned or (installed.split("+", 1)[0] == pinned and "+" not in pinned)
    if want.local is not None:
        return have == want
    return Version(have.public) == want


def find_constraints(explicit: Path | None = None) -> Path:
    """The constraints file to compare with: `--constraints`, else `$PPTK_CONSTRAINTS`, else the source checkout's.

    An explicit choice that does not exist is an error rather than a silent fallback to another file.
    """
    if explicit is not None:
        if Path(explicit).is_file():
            return Path(explicit)
        raise PptkError(f"--constraints {explicit}: no such file. Pass the path of pptk's constraints.txt.")
    from_env = os.environ.get("PPTK_CONSTRAINTS")
    if from_env:
        if Path(from_env).is_file():
            return Path(from_env)
        raise PptkError(
            f"PPTK_CONSTRAINTS={from_env}: no such file. Point it at pptk's constraints.txt "
            "(in the pptk image: /opt/pptk/constraints.txt) or unset it."
        )
    if REPO_CONSTRAINTS.is_file() and (REPO_CONSTRAINTS.parent / "pyproject.toml").is_file():
        return REPO_CONSTRAINTS
    raise PptkError(
        f"no constraints.txt to compare with: not in a source checkout ({REPO_CONSTRAINTS} is "
        "missing) and PPTK_CONSTRAINTS is not set. Pass --constraints PATH or set PPTK_CONSTRAINTS "
        "(the pptk image sets it to /opt/pptk/constraints.txt)."
    )


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(argv: list[str]) -> str | None:
    """stdout of a diagnostic command, or None when it is missing, fails or hangs."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"version": None}
    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": None,
        "nccl": None,
        "cuda_available": False,
        "device_count": 0,
        "devices": [],
        "p2p_all_pairs": None,
    }
    if torch.version.cuda is None:
        return info
    try:
        # The NCCL torch actually loads: the nvidia-nccl wheel its own pin selected, not a system copy.
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # a report, not a requirement: a broken NCCL shows as "-"
        pass
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cuda_available"] = torch.cuda.is_available()
    if not info["cuda_available"]:
        return info
    count = torch.cuda.device_count()
    info["device_count"] = count
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    if count > 1:
        info["p2p_all_pairs"] = all(
            torch.cuda.can_device_access_peer(a, b) for a in range(count) for b in range(count) if a != b
        )
    return info


def _deepspeed_info() -> dict:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return {"version": None}
    from pptk.deepspeed_compat import op_build_report

    # As `ds_report` does: which ops are prebuilt, and which could be JIT-compiled here (probed, nothing built).
    report = op_build_report()
    return {
        "version": deepspeed.__version__,
        "accelerator": report["accelerator"],
        "comm_backend": get_accelerator().communication_backend_name(),
        "ops_built_for": report["ops_built_for"],
        "ops_built_with": report["ops_built_with"],
        "ops": report["ops"],
    }


def _nvcc_version() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return None
    if CUDA_HOME is None:
        return None
    out = _run([str(Path(CUDA_HOME) / "bin" / "nvcc"), "--version"])
    match = re.search(r"release (\d+\.\d+)", out or "")
    return match.group(1) if match else None


def _nvidia_smi_gpus() -> list[dict] | None:
    out = _run(
        ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,pci.bus_id", "--format=csv,noheader,nounits"]
    )
    if out is None:
        return None
    gpus = []
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 5:
            index, name, driver, memory_mib, bus_id = fields
            gpus.append(
                {
                    "index": index,
                    "name": name,
                    "driver": driver,
                    "memory_mib": int(memory_mib) if memory_mib.isdigit() else None,
                    "bus_id": bus_id,
                }
            )
    return gpus


def parse_topology(text: str) -> dict:
    """Summarise `nvidia-smi topo -m`: the link type of every GPU pair and the NICs NCCL can use."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the header is underlined on a terminal
    lines = text.splitlines()
    header = next((line for line in lines if re.match(r"^\s+GPU0\b", line)), None)
    links: dict[str, str] = {}
    if header is not None:
        columns = [c.strip() for c in header.strip().split("\t")]
        for line in lines:
            cells = [c.strip() for c in line.split("\t")]
            if not re.fullmatch(r"GPU\d+", cells[0]):
                continue
            for column, cell in zip(columns, cells[1:], strict=False):  # trailing empty cells may be cut
                if re.fullmatch(r"GPU\d+", column) and column != cells[0]:
                    pair = sorted((cells[0], column), key=lambda gpu: int(gpu[3:]))
                    links["-".join(pair)] = cell
    nics = re.findall(r"^\s*NIC\d+:\s*(\S+)\s*$", text, flags=re.MULTILINE)
    kind, summary = _summarise_links(links, header is not None)
    return {"links": links, "nics": nics, "kind": kind, "summary": summary}


def _summarise_links(links: dict[str, str], parsed: bool) -> tuple[str, str]:
    """(kind, sentence): kind is one of unknown, single GPU, NVLink, partial NVLink, PCIe."""
    if not parsed:
        return "unknown", "unknown (could not read nvidia-smi topo -m)"
    if not links:
        return "single GPU", "single GPU"
    kinds = sorted(set(links.values()))
    nvlink = [k for k in kinds if k.startswith("NV")]
    if nvlink and len(nvlink) == len(kinds):
        return "NVLink", f"NVLink between every GPU pair ({', '.join(nvlink)})"
    if nvlink:
        linked = sum(1 for link in links.values() if link.startswith("NV"))
        return "partial NVLink", (
            f"NVLink for {linked} of {len(links)} GPU pairs, the others over PCIe ({', '.join(kinds)})"
        )
    return "PCIe", f"PCIe only, no NVLink ({', '.join(kinds)}): stages exchange activations through the host"


def _shm_bytes() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_frsize * stats.f_blocks


def _env_vars() -> dict[str, str]:
    found = {}
    for name, value in sorted(os.environ.items()):
        if name in ENV_VAR_NAMES or name.startswith(ENV_VAR_PREFIXES):
            secret = any(marker in name for marker in SECRET_MARKERS)
            found[name] = "<set>" if secret else value
    return found


def collect_env() -> dict:
    """Everything `pptk env` reports, as plain data (JSON-serialisable)."""
    pptk_requires_python = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        pptk_requires_python = importlib.metadata.metadata("pptk")["Requires-Python"]
    topology_text = _run(["nvidia-smi", "topo", "-m"])
    return {
        "python": {
            "version": platform.python_version(),
            "executable": sys.executable,
            "requires": pptk_requires_python,
        },
        "platform": platform.platform(),
        "packages": {name: _dist_version(name) for name in CORE_PACKAGES},
        "torch": _torch_info(),
        "nvcc": _nvcc_version(),
        "deepspeed": _deepspeed_info(),
        "nvidia_smi": {
            "gpus": _nvidia_smi_gpus(),
            "topology": parse_topology(topology_text) if topology_text else None,
        },
        "shm_bytes": _shm_bytes(),
        "env_vars": _env_vars(),
    }


def compare_with_pins(env: dict, pins: dict[str, str]) -> list[str]:
    """One message per core package whose installed version differs from its pin, with the fix."""
    mismatches = []
    for name, installed in env["packages"].items():
        pinned = pins.get(normalize_name(name))
        if pinned is None:
            continue
        fix = f"Fix: pip install -c constraints.txt {name}=={pinned} (in the pptk image, rebuild it: docker/README.md)."
        if installed is None:
            mismatches.append(f"{name} is not installed; constraints.txt pins {pinned}. {fix}")
        elif not versions_equal(installed, pinned):
            mismatches.append(f"{name} {installed} is installed but constraints.txt pins {pinned}. {fix}")
    return mismatches


def check_runtime(env: dict, pins: dict[str, str]) -> list[str]:
    """Problems that are not version pins: the Python, the torch CUDA build, the driver, prebuilt ops."""
    problems = []
    python, torch_env = env["python"], env["torch"]
    if python.get("requires"):
        with contextlib.suppress(InvalidSpecifier):
            if python["version"] not in SpecifierSet(python["requires"]):
                problems.append(
                    f"Python {python['version']} does not satisfy pptk's requires-python "
                    f"{python['requires']}. Fix: create the venv with Python 3.11 (`make install`)."
                )
    cuda_build = torch_env.get("cuda_build")
    tag = "cu" + cuda_build.replace(".", "") if cuda_build else "cpu"
    expected = os.environ.get("PPTK_EXPECT_TORCH_CUDA")
    if expected and torch_env.get("version") and tag != expected:
        problems.append(
            f"torch {torch_env['version']} is a {tag} build but this image expects {expected}. "
            f"Fix: pip install --extra-index-url <PyTorch's {expected} wheel index, the URL ending in "
            f"/whl/{expected}> torch=={pins.get('torch', '<pin>')}+{expected}, or rebuild the image."
        )
    gpus = env["nvidia_smi"]["gpus"] or []
    if gpus and torch_env.get("version") and not torch_env.get("cuda_available"):
        driver = gpus[0]["driver"]
        if cuda_build is None:
            problems.append(
                f"nvidia-smi sees {len(gpus)} GPU(s) but torch {torch_env['version']} is a CPU-only "
                "build. Fix: install the CUDA build of the pinned torch, or use the pptk image."
            )
        else:
            need = MIN_DRIVER_FOR_CUDA.get(int(cuda_build.split(".")[0]))
            hint = f"CUDA {cuda_build} needs driver {need} or newer" if need else "check the driver"
            problems.append(
                f"nvidia-smi sees {len(gpus)} GPU(s) (driver {driver}) but torch {torch_env['version']} "
                f"cannot use them: {hint}, and containers need --gpus all. Fix: upgrade the driver "
                "or start the container with the GPUs."
            )
    ds = env["deepspeed"]
    if ds.get("ops") and any(op["prebuilt"] for op in ds["ops"].values()) and torch_env.get("version"):
        built = ds["ops_built_with"]
        torch_minor = ".".join(torch_env["version"].split("+")[0].split(".")[:2])
        cuda_minor = ".".join((cuda_build or "0.0").split(".")[:2])
        if (built["torch"], built["cuda"]) != (torch_minor, cuda_minor):
            problems.append(
                f"DeepSpeed's prebuilt ops were compiled with torch {built['torch']} / CUDA "
                f"{built['cuda']} but torch {torch_minor} / CUDA {cuda_minor} is installed: they will "
                "fail to load. Fix: reinstall deepspeed after torch, or rebuild the image."
            )
    return problems


def runtime_warnings(env: dict) -> list[str]:
    """Things that do not fail the check but commonly break a first multi-GPU run."""
    notes = []
    shm = env.get("shm_bytes")
    if shm is not None and shm < SMALL_SHM_BYTES and env["torch"].get("device_count", 0) > 1:
        notes.append(
            f"/dev/shm is {shm / 2**20:.0f} MiB: NCCL and data loaders need more. "
            "Start the container with --ipc=host (or --shm-size=16g)."
        )
    ds = env["deepspeed"]
    if ds.get("accelerator") == "cuda":
        fused = ds.get("ops", {}).get("fused_adam")
        if fused and not fused["prebuilt"] and not env.get("nvcc"):
            notes.append(
                "DeepSpeed's fused_adam is not prebuilt and there is no nvcc to JIT-compile it: "
                "Adam(W) runs will fail. Use the pptk image or install the CUDA toolkit."
            )
    return notes
