# DeepSpeed internals of its seeding and its JIT-built C++ ops.
from __future__ import annotations

from pptk.errors import PptkError


def set_random_seed(seed: int) -> None:
    """Seed Python's, NumPy's, torch's and the accelerator's generators on this rank.

    Written against DeepSpeed 0.19.8: ``deepspeed.runtime.utils.set_random_seed`` (not exported at the top level).
    """
    from deepspeed.runtime.utils import set_random_seed as seed_all

    seed_all(seed)


def op_build_report() -> dict:
    """What ``ds_report`` shows about DeepSpeed's ops: which are prebuilt for this accelerator, which could be
    JIT-compiled here (probed, nothing built), and the accelerator and torch/CUDA they were built for.

    Written against DeepSpeed 0.19.8: ``deepspeed.git_version_info`` (installed_ops, accelerator_name, torch_info),
    ``deepspeed.ops.op_builder.all_ops.ALL_OPS`` and the accelerator's ``_name``.
    """
    import contextlib
    import io

    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name as built_for
    from deepspeed.git_version_info import installed_ops, torch_info
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    accelerator = get_accelerator()
    current = getattr(accelerator, "_name", accelerator.device_name())
    ops = {}
    # Probes print warnings; keep them out of the report.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name, builder in ALL_OPS.items():
            try:
                compatible = bool(builder.is_compatible(verbose=False))
            except Exception:  # a failing probe means "cannot build here", as in deepspeed's probe_is_compatible
                compatible = False
            ops[name] = {"prebuilt": bool(installed_ops.get(name)) and built_for == current, "compatible": compatible}
    return {
        "accelerator": current,
        "ops_built_for": built_for,
        "ops_built_with": {"torch": torch_info.get("version"), "cuda": torch_info.get("cuda_version")},
        "ops": ops,
    }


# A JIT build of one op takes well under this on any machine; a build lock older than that was left by a killed build.
STALE_BUILD_LOCK_S = 600


def skip_unused_cpu_ops() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce op at ``init_distributed``.

    Written against DeepSpeed 0.19.8: ``deepspeed.comm.torch.build_shm_op`` builds ``deepspeed_shm_comm`` (a C++
    compile, under torch's build lock) on every start when ``deepspeed.ops.__compatible_ops__`` says it can, and only
    ``inference_all_reduce`` uses it, which training never calls. Marking it incompatible skips the build and the
    lock, which a rank killed while holding it leaves behind for every later start to wait on forever.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def check_build_locks(now: float | None = None) -> None:
    """Refuse to start when a build lock of DeepSpeed's JIT-built ops is stale: every rank would wait on it forever.

    Written against DeepSpeed 0.19.8 (its ops load through ``torch.utils.cpp_extension.load``, whose ``FileBaton``
    is a ``lock`` file in the op's build directory, removed when the build ends and left behind when the building
    process is killed). Ranks of one job build at the same moment, so a lock older than ``STALE_BUILD_LOCK_S`` is
    not theirs.
    """
    import os
    import time
    from pathlib import Path

    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    from torch.utils.cpp_extension import get_default_build_root

    never_built = {ShareMemCommBuilder.NAME}  # see skip_unused_cpu_ops
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time() if now is None else now
    for lock in sorted(lock for lock in root.glob("*/*/lock") if lock.parent.name not in never_built):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build it guarded just finished
            continue
        if age > STALE_BUILD_LOCK_S:
            raise PptkError(
                f"{lock} is {age / 60:.0f} minutes old: a process killed while building DeepSpeed's "
                f"{lock.parent.name} op left it, and every rank would wait on it forever. Remove it (rm {lock}) "
                "and start again"
            )


def check_cuda_arch_list(environ=None) -> None:
    """Refuse a ``TORCH_CUDA_ARCH_LIST`` that DeepSpeed's JIT op builder cannot read, before it fails mid-start.

    Written against DeepSpeed 0.19.8: ``OpBuilder.compute_capability_args`` sorts the entries by ``int`` of each
    dot-separated part (``+PTX`` stripped), so an architecture-specific entry such as ``9.0a`` (which CUDA images for
    Hopper set) makes the FusedAdam build fail with ``invalid literal for int() with base 10: '0a'``.
    """
    import os
    import re

    value = (os.environ if environ is None else environ).get("TORCH_CUDA_ARCH_LIST", "")
    entries = [cc for cc in value.replace(" ", ";").split(";") if cc]
    unreadable = [cc for cc in entries if not re.fullmatch(r"\d+\.\d+(\+PTX)?", cc)]
    if unreadable:
        plain = ";".join(dict.fromkeys(re.sub(r"[^0-9.].*$", "", cc) or cc for cc in entries))
        raise PptkError(
            f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed 0.19.8 cannot read {', '.join(unreadable)} when it builds "
            f"its fused optimizer; set TORCH_CUDA_ARCH_LIST={plain!r} (its ops use no architecture-specific "
            "instruction)"
        )


def build_op(builder_name: str) -> None:
    """JIT-build one of DeepSpeed's ops for this accelerator (or load it from torch's extensions cache), e.g.
    ``"FusedAdamBuilder"``, the optimizer the shipped bf16 config makes DeepSpeed build on first use.

    Written against DeepSpeed 0.19.8: ``get_accelerator().create_op_builder(name)`` returns the accelerator's
    builder (the CPU one under ``DS_ACCELERATOR=cpu``) or None; ``.load()`` builds under torch's file lock.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        raise PptkError(f"DeepSpeed has no {builder_name} for the {get_accelerator().device_name()} accelerator")
    builder.load()
