# `pptk verify` on a broken checkpoint: one line naming it, before any rank starts, never a raw traceback.
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pptk.cli import main


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_a_truncated_checkpoint_is_one_line(saved, capsys):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    assert main(["verify", str(saved), "--pp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pptk verify: error: Hugging Face cannot load {saved}") and "truncated" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_shape_are_one_line(saved, capsys):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"n_embd": 64}))
    assert main(["verify", str(saved), "--pp", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("pptk verify: error: Hugging Face cannot load")
    assert "Traceback" not in err
