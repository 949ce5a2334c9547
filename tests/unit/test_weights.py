# Per-stage loading from Hugging Face safetensors: sharded checkpoints, and clear errors for broken ones.
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pptk.errors import PptkError
from pptk.parallel.hf_weights import HFCheckpoint
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline, resolve_model


def _save(path, *, n_embd=64, shard=None):
    config = GPT2Config(
        vocab_size=256, n_positions=16, n_embd=n_embd, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return model


def _load(path):
    return build_sequential_module(plan_pipeline(resolve_model(path), num_stages=1, dropout=False))


def test_sharded_checkpoint_loads_tensor_by_tensor(tmp_path):
    model = _save(tmp_path, shard="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "the test needs a really sharded checkpoint"
    pipe = _load(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(pipe((ids, mask)), model.eval()(input_ids=ids, attention_mask=mask).logits)


def test_missing_shard_is_named(tmp_path):
    _save(tmp_path, shard="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(PptkError, match=f"lists shard {shard.name} but .* is missing; re-download"):
        _load(tmp_path)


def test_corrupt_file_is_reported(tmp_path):
    _save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PptkError, match="corrupt or truncated"):
        HFCheckpoint(tmp_path)


def test_shape_mismatch_lists_tensors_and_leaves_module_untouched(tmp_path):
    _save(tmp_path / "small", n_embd=32)
    _save(tmp_path / "big", n_embd=64)
    # the 64-wide config with the 32-wide weights
    (tmp_path / "big" / "model.safetensors").write_bytes((tmp_path / "small" / "model.safetensors").read_bytes())
    with pytest.raises(PptkError, match=r"shape mismatch: .*checkpoint \[256, 32\] vs model \[256, 64\]"):
        _load(tmp_path / "big")


def test_pytorch_bin_checkpoints_get_a_conversion_hint(tmp_path):
    _save(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(PptkError, match="PyTorch .bin weights: re-save"):
        HFCheckpoint(tmp_path)


def test_a_directory_with_only_bin_weights_is_refused_not_trained_from_random_weights(tmp_path):
    """resolve_model is where recipes, verify and convert learn whether a directory has weights: a .bin-only
    directory used to count as weight-less, so it trained (and verified) from a random initialisation."""
    _save(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(PptkError, match=r"weights pptk cannot read \(pytorch_model.bin\); re-save it as safetensors"):
        resolve_model(tmp_path)
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(PptkError, match="model.safetensors.index.json"):
        resolve_model(tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    assert resolve_model(tmp_path).pretrained_dir is None  # config only: a fresh model, as asked


def test_wrong_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(PptkError, match="model type 't5' has no pptk family module; supported: .*gpt2"):
        resolve_model(tmp_path / "config.json")


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "dim", "split"),  # split: (fused parts, true length of a padded dimension or 0)
    [
        ((12, 8), 0, (1, 0)),
        ((12, 8), 1, (1, 0)),
        ((8, 12), 1, (3, 0)),
        ((12, 5), 0, (3, 0)),
        ((3, 8, 4), 1, (2, 0)),
        ((16,), 0, (1, 0)),
        ((11, 8), 0, (1, 11)),  # a vocabulary tp does not divide: the last rank's slice ends in a zero row
        ((11,), 0, (1, 11)),
    ],
)
def test_a_tp_rank_reads_exactly_its_slice(tmp_path, file_dtype, shape, dim, split):
    """Row runs read straight into the parameter (or through a buffer when the file holds another dtype) give
    what cutting the full tensor gives, for every rank, split dimension, fused layout (GPT-2's q | k | v) and
    padded split (pptk.parallel.vocab_parallel)."""
    from safetensors.torch import save_file

    from pptk.parallel.tensor_parallel import ShardSpec

    fused, full = split
    full_tensor = torch.randn(shape).to(file_dtype)
    save_file({"w": full_tensor, "other": torch.ones(3)}, tmp_path / "model.safetensors")
    checkpoint = HFCheckpoint(tmp_path)
    for rank in range(2):
        spec = ShardSpec(dim=dim, rank=rank, size=2, fused=fused, full=full)
        expected = spec.take(full_tensor.float())
        target = torch.full_like(expected, float("nan"))
        checkpoint.read_slice_into("w", target, spec)
        assert torch.equal(target, expected), (rank, target, expected)
