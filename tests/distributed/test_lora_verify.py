# `pptk verify --lora-r`: LoRA on a pp=2 pipeline through DeepSpeed's engine against peft on Hugging Face, with the
# same non-zero adapters: the loss, the adapters after one step, and the frozen weights untouched, in fp32 and bf16.
# Every job rides on the session's shared pp=2 launch (conftest.lora_jobs); two are broken on purpose and must fail.
# And the training engine (build_engine) with LoRA under the shipped bf16 config, in a launch of its own.
import pytest
from conftest import LORA_CASES

from pptk.verify.compare import BF16_TOLERANCE, FP32_TOLERANCE

pytestmark = pytest.mark.dist

PRECISIONS = ("fp32", "bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_pipeline_matches_peft_on_hugging_face(verified_pp2, name, precision):
    result = verified_pp2[(f"lora-{precision}", name)]
    assert result.passed, result.describe()
    assert result.pp == 2 and result.precision == precision and result.lora is not None
    assert result.params_pipeline == result.params_reference  # the base model and every adapter, each once
    if precision == "fp32":
        assert result.loss_rel_diff <= FP32_TOLERANCE and result.max_param_diff <= FP32_TOLERANCE
    else:  # measured: at most 0.22 (BERT), 0.18 (LLaMA), 0.16 (GPT-2) noise units; the loss from the same bf16 logits
        assert result.max_param_diff <= BF16_TOLERANCE and result.loss_noise_units <= BF16_TOLERANCE
        assert result.loss_rel_diff < 1e-5
    # the step moved the adapters (non-zero B: lora_A gets a gradient) and left every frozen weight exactly as it was
    assert result.largest_update > 1e-3, result.describe()
    assert result.frozen_tensors > 0 and result.frozen_max_diff == 0.0
    trained = [name for name, _ in result.largest_diffs]
    assert trained and all(name.startswith("base_model.model.") for name in trained)  # compared by adapter keys


# What each case trains (the small configs: hidden 64, 4 blocks; an adapter on in -> out adds r * (in + out)), as peft
# trains it on the same request: the comparison fails on any parameter one side trains and the other does not.
TRAINED = {
    # r=8 on all-linear: c_attn 64->192, attn.c_proj 64->64, c_fc 64->256, mlp.c_proj 256->64
    "gpt2": 4 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)),
    # r=8 on all-linear, k/v 64->32 (2 kv heads of 16), MLP 112 wide; plus 4 post-attention norms trained in full
    "llama": 4 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 112)) + 4 * 64,
    # r=4 on the regular expression's q_proj, v_proj and down_proj
    "qwen3": 4 * 4 * ((64 + 64) + (64 + 32) + (112 + 64)),
    # r=8 on query and value, and the token-classification head (64 -> 3 labels) trained in full as peft's TOKEN_CLS
    "bert": 4 * 8 * 2 * (64 + 64) + (64 * 3 + 3),
}


@pytest.mark.parametrize("name", list(LORA_CASES))
def test_each_target_form_trains_what_peft_trains(verified_pp2, name):
    for precision in PRECISIONS:
        assert verified_pp2[(f"lora-{precision}", name)].params_trained == TRAINED[name]


def test_a_wrong_adapter_fails_the_lora_check(verified_pp2):
    result = verified_pp2[("lora-fp32", "wrong-adapter")]
    assert not result.passed
    worst = [name for name, _ in result.largest_diffs[:2]]
    assert sorted(worst) == [
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
    ], result.describe()
    assert result.max_param_diff > 1e3 * FP32_TOLERANCE
    assert result.frozen_max_diff == 0.0  # only the adapters were swapped


def test_a_wrong_base_weight_fails_as_a_frozen_weight_that_differs(verified_pp2):
    result = verified_pp2[("lora-fp32", "wrong-base-weight")]
    assert not result.passed
    assert result.frozen_max_diff > 1e-3, result.describe()
    assert any(
        problem.startswith("frozen weight model.layers.0.mlp.") and "only the adapters and modules_to_save" in problem
        for problem in result.problems
    ), result.problems


def _train_with_lora(rank: int, out: str) -> None:
    """Four steps of the recipes' engine (build_engine, the shipped bf16 config: BF16_Optimizer and Adam) with LoRA.
    The warm-up gives the first two steps lr 0; B (peft's zeros) moves at the third, A at the fourth."""
    import torch

    from pptk.deepspeed_compat import get_param_state
    from pptk.parallel.layout import Layout
    from pptk.parallel.lora import LoraSettings
    from pptk.parallel.pipeline import plan_pipeline
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config
    from pptk.training.engine import build_engine, init_distributed

    init_distributed()
    layout = Layout(pp=2, dp=1, micro_batch_size=2, grad_accum_steps=2)
    config = fill_ds_config(
        load_ds_config(shipped_config("bf16")),
        layout=layout,
        lr=1e-2,
        weight_decay=0.0,
        warmup_steps=1,
        total_steps=10,
        grad_clip=1.0,
    )
    plan = plan_pipeline("gpt2", num_stages=2, dropout=False, seq_len=16)  # the tied embedding on both stages
    engine = build_engine(plan, layout=layout, ds_config=config, seed=0, loss_fn=plan.loss_fn(), lora=LoraSettings(r=4))

    def weights() -> dict:  # the fp32 master copies of what trains (a small bf16 update may not show in bf16)
        return {
            key: get_param_state(engine.optimizer, p, "fp32") if p.requires_grad else p.detach().clone()
            for key, p in engine.module.named_parameters()
        }

    before = weights()
    ids = torch.randint(3, plan.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = [float(engine.train_batch(iter([((ids, torch.ones_like(ids)), ids)] * 2))) for _ in range(4)]
    params, after = dict(engine.module.named_parameters()), weights()
    torch.save(
        {
            "losses": losses,
            "moved": sorted(k for k, value in after.items() if not torch.equal(value, before[k])),
            "trainable": sorted(k for k, p in params.items() if p.requires_grad),
            "frozen": sorted(k for k, p in params.items() if not p.requires_grad),
            "optimizer_numel": sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"]),
            "trainable_numel": sum(p.numel() for p in params.values() if p.requires_grad),
        },
        f"{out}/rank{rank}.pt",
    )


def test_the_training_engine_trains_only_the_adapters_in_bf16(tmp_path):
    """build_engine(lora=...) as the recipes will call it: frozen tied embeddings on both stages under BF16_Optimizer
    (DeepSpeed 0.19.8 read their missing _hp_grad, pptk.deepspeed_compat.allow_frozen_tied_weights)."""
    import torch

    from pptk.launch.ranks import run_ranks

    run_ranks(_train_with_lora, world_size=2, args=(str(tmp_path),), log_dir=tmp_path / "logs")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["trainable"] and all(".lora_" in key for key in result["trainable"]), result["trainable"]
        assert any(key.startswith("tied_modules.") for key in result["frozen"])  # the word embeddings, frozen
        assert result["optimizer_numel"] == result["trainable_numel"]  # the optimizer holds the adapters only
        assert set(result["moved"]) == set(result["trainable"])  # every adapter moved, nothing frozen did
    assert result["losses"][-1] < result["losses"][0], result["losses"]
