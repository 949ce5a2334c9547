# `pptk env`: the report's text and the command's flags (what the environment is: pptk/launch/env_report.py).
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from pptk.errors import PptkError
from pptk.launch.env_report import (
    EXIT_MISMATCH,
    EXIT_NO_CONSTRAINTS,
    EXIT_OK,
    PIPELINE_OPS,
    check_runtime,
    collect_env,
    compare_with_pins,
    find_constraints,
    normalize_name,
    read_pins,
    runtime_warnings,
    versions_equal,
)


def _versions_line(env: dict) -> str:
    torch_env, ds = env["torch"], env["deepspeed"]
    cuda = f"CUDA {torch_env['cuda_build']}" if torch_env.get("cuda_build") else "CPU build"
    nccl = f", NCCL {torch_env['nccl']}" if torch_env.get("nccl") else ""
    devices = torch_env.get("devices") or []
    if devices:
        gpus = f"{len(devices)} x {devices[0]['name']}"
        topology = env["nvidia_smi"]["topology"]
        if topology and len(devices) > 1:
            gpus += f", {topology['kind']}"
    else:
        gpus = "no GPU"
    return (
        f"Python {env['python']['version']}, torch {torch_env.get('version')} ({cuda}{nccl}), "
        f"deepspeed {ds.get('version')} ({ds.get('accelerator')}), "
        f"transformers {env['packages'].get('transformers')}; {gpus}"
    )


def format_report(env: dict, pins: dict[str, str], constraints: Path, problems: list[str], warnings: list[str]) -> str:
    torch_env, ds, smi = env["torch"], env["deepspeed"], env["nvidia_smi"]
    out = [f"pptk environment (pins from {constraints})", ""]
    out.append(f"Python        {env['python']['version']}  ({env['python']['executable']})")
    out.append(f"Platform      {env['platform']}")
    out.append("")
    out.append(f"{'package':<16}{'installed':<18}{'pinned':<12}")
    for name, installed in env["packages"].items():
        pinned = pins.get(normalize_name(name))
        status = "" if pinned is None else ("ok" if installed and versions_equal(installed, pinned) else "MISMATCH")
        out.append(f"{name:<16}{installed or '-':<18}{pinned or '-':<12}{status}")
    out.append("")
    if torch_env.get("cuda_build"):
        cudnn = torch_env.get("cudnn") or "-"
        out.append(
            f"CUDA          torch built for CUDA {torch_env['cuda_build']}, cuDNN {cudnn}, "
            f"NCCL {torch_env.get('nccl') or '-'}; nvcc {env.get('nvcc') or 'not found'}"
        )
    else:
        out.append("CUDA          torch is a CPU-only build")
    devices = torch_env.get("devices") or []
    if devices:
        for dev in devices:
            out.append(
                f"GPU {dev['index']:<9} {dev['name']}, compute capability {dev['capability']}, {dev['memory_gib']} GiB"
            )
    else:
        out.append("GPUs          none usable by torch")
    if smi["gpus"] is not None:
        drivers = sorted({gpu["driver"] for gpu in smi["gpus"]})
        out.append(f"nvidia-smi    {len(smi['gpus'])} GPU(s), driver {', '.join(drivers) or '-'}")
    else:
        out.append("nvidia-smi    not available")
    topology = smi["topology"]
    if topology:
        out.append(f"Interconnect  {topology['summary']}")
        out.append(f"NICs          {', '.join(topology['nics']) or 'none listed'}")
    elif torch_env.get("p2p_all_pairs") is not None:
        out.append(f"Interconnect  peer access between all GPU pairs: {torch_env['p2p_all_pairs']}")
    else:
        out.append("Interconnect  unknown (no nvidia-smi topo -m)")
    out.append("")
    if ds.get("version"):
        out.append(
            f"DeepSpeed     {ds['version']}: accelerator {ds['accelerator']} ({ds['comm_backend']}); "
            f"prebuilt ops target {ds['ops_built_for'] or '-'}"
        )
        out.append(f"  {'op':<28}{'prebuilt':<10}JIT-compatible")
        ordered = [op for op in PIPELINE_OPS if op in ds["ops"]] + sorted(set(ds["ops"]) - set(PIPELINE_OPS))
        for name in ordered:
            op = ds["ops"][name]
            out.append(f"  {name:<28}{'yes' if op['prebuilt'] else 'no':<10}{'yes' if op['compatible'] else 'no'}")
    else:
        out.append("DeepSpeed     not installed")
    out.append("")
    shm = env.get("shm_bytes")
    out.append(f"/dev/shm      {shm / 2**30:.1f} GiB" if shm is not None else "/dev/shm      unknown")
    for name, value in env["env_vars"].items():
        out.append(f"env           {name}={value}")
    out.append("")
    out.extend(f"warning: {note}" for note in warnings)
    if problems:
        out.append(f"{len(problems)} problem(s):")
        out.extend(f"  - {problem}" for problem in problems)
    else:
        out.append(f"OK: the stack matches {constraints.name}")
    return "\n".join(out)


def env_main(*, json_output: bool, quiet: bool, constraints: Path | None) -> int:
    """Print the report (or JSON) and return 0 when it matches the pins, 1 on a mismatch, 2 without pins."""
    try:
        constraints_path = find_constraints(constraints)
        pins = read_pins(constraints_path)
    except PptkError as err:
        print(f"pptk env: {err}", file=sys.stderr)
        return EXIT_NO_CONSTRAINTS
    # DeepSpeed logs to stdout while importing; keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        env = collect_env()
    problems = compare_with_pins(env, pins) + check_runtime(env, pins)
    warnings = runtime_warnings(env)
    if json_output:
        print(
            json.dumps(
                {
                    "ok": not problems,
                    "constraints": str(constraints_path),
                    "problems": problems,
                    "warnings": warnings,
                    "env": env,
                },
                indent=2,
            )
        )
    elif quiet:
        if problems:
            print(f"pptk env: {len(problems)} problem(s) (pins from {constraints_path}):")
            print("\n".join(f"  - {problem}" for problem in problems))
        else:
            print(f"pptk env: OK, {_versions_line(env)}")
    else:
        print(format_report(env, pins, constraints_path, problems, warnings))
    return EXIT_MISMATCH if problems else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pptk env`."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="one line when OK, otherwise only the problems")
    parser.add_argument(
        "--constraints",
        type=Path,
        default=None,
        metavar="PATH",
        help="constraints file to compare with (default: $PPTK_CONSTRAINTS, then the checkout's)",
    )


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(prog="pptk env", description="report the software stack and GPUs")
        add_arguments(parser)
        args = parser.parse_args()
    return env_main(json_output=args.json, quiet=args.quiet, constraints=args.constraints)
