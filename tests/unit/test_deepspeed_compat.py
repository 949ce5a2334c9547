# DeepSpeed internals live in pptk/deepspeed_compat/ only: the rest of pptk, the recipes and the benchmarks use
# DeepSpeed's public API. Each compat function names the DeepSpeed version it was written against.
import ast
import inspect
from pathlib import Path

import deepspeed
import pytest
import torch

from pptk import deepspeed_compat as compat

ROOT = Path(__file__).resolve().parents[2]
COMPAT = sorted((ROOT / "pptk" / "deepspeed_compat").glob("*.py"))
SCANNED = sorted({*ROOT.glob("pptk/**/*.py"), *ROOT.glob("recipes/*.py"), *ROOT.glob("benchmarks/*.py")} - set(COMPAT))

# DeepSpeed's documented API: what its tutorials and API reference show users.
PUBLIC_MODULES = {
    "deepspeed": {"initialize", "init_distributed", "comm", "pipe", "__version__"},
    "deepspeed.pipe": None,  # None: every name
    "deepspeed.accelerator": {"get_accelerator"},
    "deepspeed.runtime.pipe.topology": {"PipeDataParallelTopology", "PipeModelDataParallelTopology", "ProcessTopology"},
    "deepspeed.runtime.lr_schedules": None,
    "deepspeed.utils": {
        "safe_get_full_fp32_param",
        "safe_set_full_fp32_param",
        "safe_get_full_optimizer_state",
        "safe_set_full_optimizer_state",
        "safe_get_full_grad",
        "safe_set_full_grad",
    },
}
# Engine, module and optimizer-wrapper attributes that are not public API (read or written).
INTERNAL_ATTRIBUTES = {
    "global_steps",
    "global_samples",
    "_hp_mapping",
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "_lazy_init_hp_params_optimizer_state",
    "_hp_optimizer_states_linked",
    "refresh_fp32_params",
    "loss_scaler",
    "loss_scale_config",
    "load_state_dir",
    "checkpoint_engine",
    "_topo",
    "_set_bounds",
    "clip_fp32_gradients",
    "_name",
    "parts",
}
# Uses in files another change is rewriting (the one trainer, pptk/tasks/); each has its compat function already.
# When one disappears the test fails until its entry is removed, so this list only shrinks.
TO_BE_WIRED: set[tuple[str, str]] = set()


def _violations(path: Path) -> set[tuple[str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(ROOT))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deepspeed":
            allowed = PUBLIC_MODULES.get(node.module, set())
            if allowed is not None and any(alias.name not in allowed for alias in node.names):
                found.add((rel, f"from {node.module}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepspeed.") and alias.name not in PUBLIC_MODULES:
                    found.add((rel, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Name)
                and node.value.id == "deepspeed"
                and node.attr not in PUBLIC_MODULES["deepspeed"]
            ):
                found.add((rel, f"deepspeed.{node.attr}"))
            if node.attr in INTERNAL_ATTRIBUTES:
                found.add((rel, f".{node.attr}"))
            is_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            if node.attr == "loss_fn" and isinstance(node.ctx, ast.Store) and not is_self:
                found.add((rel, ".loss_fn ="))
            if node.attr == "optimizer" and isinstance(node.value, ast.Attribute) and node.value.attr == "optimizer":
                found.add((rel, ".optimizer.optimizer"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in INTERNAL_ATTRIBUTES
        ):
            found.add((rel, f".{node.args[1].value}"))
    return found


def test_only_deepspeed_compat_uses_deepspeed_internals():
    found = set().union(*(_violations(path) for path in SCANNED))
    unexpected = sorted(found - TO_BE_WIRED)
    assert not unexpected, f"DeepSpeed internals outside pptk/deepspeed_compat/: {unexpected}; add a function there"
    gone = sorted(TO_BE_WIRED - found)
    assert not gone, f"{gone} no longer use DeepSpeed internals: remove them from TO_BE_WIRED"


def test_the_scan_sees_what_it_should():
    """The checker flags each kind of use it looks for (run on deepspeed_compat/, which has them all)."""
    found = {use for path in COMPAT for _, use in _violations(path)}
    assert {
        "from deepspeed.runtime.bf16_optimizer",
        ".global_steps",
        "._hp_optimizer_states_linked",
        ".loss_fn =",
        ".fp32_groups_flat_partition",
        "._topo",
    } <= found


def test_every_compat_function_names_the_deepspeed_version_it_was_written_against():
    assert deepspeed.__version__ == compat.DEEPSPEED_VERSION, (
        f"DeepSpeed {deepspeed.__version__} is installed but pptk/deepspeed_compat/ was written against "
        f"{compat.DEEPSPEED_VERSION}: re-read each function's DeepSpeed source, run "
        "tests/distributed/test_optimizer_wrappers.py, then update DEEPSPEED_VERSION and the docstrings"
    )
    functions = [
        f
        for name, f in inspect.getmembers(compat, inspect.isfunction)
        if f.__module__.startswith(compat.__name__ + ".") and not name.startswith("_")
    ]
    assert len(functions) >= 15
    for function in functions:
        assert f"DeepSpeed {compat.DEEPSPEED_VERSION}" in " ".join((function.__doc__ or "").split()), function.__name__


@pytest.mark.parametrize(
    "cls_path",
    ["deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "deepspeed.runtime.bf16_optimizer.BF16_Optimizer"],
)
def test_the_wrapper_internals_compat_relies_on_still_exist(cls_path):
    """A cheap early warning for upgrades (the real check runs every wrapper: test_optimizer_wrappers.py)."""
    import importlib

    module, _, name = cls_path.rpartition(".")
    source = inspect.getsource(getattr(importlib.import_module(module), name))
    for needle in (
        "_lazy_init_hp_params_optimizer_state",
        "_hp_optimizer_states_linked",
        "refresh_fp32_params",
        "single_partition_of_fp32_groups" if "zero" in module else "fp32_groups_flat_partition",
    ):
        assert needle in source, (cls_path, needle)


def test_loss_scale_state_is_none_without_fp16_scaling():
    assert compat.loss_scale_state(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])) is None


def test_a_stale_build_lock_is_one_error_naming_the_file_and_a_fresh_one_is_left_alone(tmp_path, monkeypatch):
    """torch's build lock left by a killed rank made every later DeepSpeed start wait forever (it hung CI)."""
    import os
    import time

    from pptk.errors import PptkError

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    compat.check_build_locks()  # a build in progress right now: wait for it, as torch does
    old = time.time() - compat.ops.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(PptkError, match=rf"{lock} is 11 minutes old: .* fused_adam op .*\(rm {lock}\)"):
        compat.check_build_locks()


def test_the_cpu_backend_no_longer_builds_its_shared_memory_op():
    from deepspeed.comm.torch import build_shm_op

    compat.skip_unused_cpu_ops()
    assert build_shm_op() is None


def test_a_stale_lock_of_the_skipped_op_does_not_stop_a_start(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))
    compat.check_build_locks()


def test_an_arch_list_deepspeed_cannot_parse_is_refused_with_the_list_it_can(monkeypatch):
    """CUDA images for Hopper set TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed 0.19.8's op builder then fails mid-start."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from pptk.deepspeed_compat import check_cuda_arch_list
    from pptk.errors import PptkError

    for readable in ("8.0;9.0+PTX", "8.0 9.0", None):
        if readable is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", readable)
        check_cuda_arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a")
    with pytest.raises(PptkError, match=r"cannot read 9\.0a .*TORCH_CUDA_ARCH_LIST='8\.0;9\.0'"):
        check_cuda_arch_list()
    builder = FusedAdamBuilder()  # the reason is real: DeepSpeed's own JIT builder rejects that list
    builder.jit_mode = True
    with pytest.raises(ValueError, match="invalid literal for int"):
        builder.compute_capability_args()
