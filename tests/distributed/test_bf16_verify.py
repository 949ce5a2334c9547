# `pptk verify` in bf16: the shipped bf16 config (DeepSpeed's BF16_Optimizer) against Hugging Face in bf16, and two
# deliberately broken jobs that the check must fail; selective checkpointing in fp32 and bf16. All of them ride on
# the session's shared pp=2 launch.
import pytest

from pptk.verify.compare import BF16_TOLERANCE

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_bf16_pipeline_matches_hugging_face_in_bf16(verified_pp2, name):
    result = verified_pp2[("bf16", name)]
    assert result.passed, result.describe()
    assert result.precision == "bf16" and result.tolerance == BF16_TOLERANCE
    assert result.params_pipeline == result.params_reference
    # measured: 0.77 (GPT-2), 0.89 (BERT), 0.21 (LLaMA) in units of Hugging Face's own bf16 error; tolerance 4
    assert result.max_param_diff <= BF16_TOLERANCE and result.loss_noise_units <= BF16_TOLERANCE
    assert result.loss_rel_diff < 1e-5  # the loss is computed in fp32 from the same bf16 logits on both sides


def test_a_wrong_weight_mapping_fails_the_bf16_check(verified_pp2):
    result = verified_pp2[("bf16", "wrong-weight-mapping")]
    assert not result.passed
    worst = dict(result.largest_diffs)
    assert set(list(worst)[:2]) == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert result.max_param_diff > 25 * BF16_TOLERANCE, result.describe()  # far outside rounding noise
    assert "x Hugging Face's own bf16 error" in result.problems[0]


def test_a_wrong_padding_mask_fails_the_bf16_check(verified_pp2):
    """Padding changes so little of the loss that only the gradients show it: the check compares both."""
    result = verified_pp2[("bf16", "wrong-mask")]
    assert not result.passed
    assert result.max_param_diff > 5 * BF16_TOLERANCE, result.describe()
    assert "attention" in result.largest_diffs[0][0], result.largest_diffs


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "llama-bf16"])
def test_selective_checkpointing_matches_hugging_face(verified_pp2, name):
    """Each block's attention recomputed in the backward (pptk.parallel.recompute): the same step as Hugging Face's;
    tests/unit/test_recompute.py shows the block keeps less."""
    result = verified_pp2[("selective", name)]
    assert result.passed, result.describe()
    assert result.precision == ("bf16" if name.endswith("bf16") else "fp32")
