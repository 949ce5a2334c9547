# `pptk verify --lora-r`: LoRA on a pp=2 pipeline through DeepSpeed's engine against peft on Hugging Face, with the
# same non-zero adapters: the loss, the adapters after one step, and the frozen weights untouched, in fp32 and bf16.
# Every job rides on the session's shared pp=2 launch (conftest.lora_jobs); two are broken on purpose and must fail.
# Training with LoRA through the recipes (bf16's frozen tied embeddings included): test_lora_training.py.
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
