# The reward and decoder-classifier data paths in one process: rows interleaved by pair, the metrics, and every bad
# input refused before any rank starts (through the recipes' own build + prepare).
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pptk.data.demo_chat import CHATML
from pptk.data.pairs import EncodedPair
from pptk.errors import PptkError
from pptk.tasks.metrics import pair_metrics
from pptk.tasks.reward import pair_rows

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["what", "is", "two", "plus", "four", "six", "five", "yes", "no", "the", "good", "bad", ".", "?", "user"]
WORDS += ["assistant", "system"]
SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>", "\n"]


def _tokenizer(*, pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + ["[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<pad>" if pad else None,
        eos_token="<|endoftext|>" if eos else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("decoder")
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _prepared(recipe: str, *argv: str):
    run, prepare = _recipe(recipe).build([*argv, "--output-dir", "unused"])
    return prepare(run)


def _pairs_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD_PAIRS = [{"prompt": "what is two plus four ?", "chosen": "six .", "rejected": "five ."}] * 4


def test_a_micro_batch_holds_whole_pairs_interleaved():
    pairs = [EncodedPair([1, 2, 3], [0, 1, 1], [1, 2], [0, 1]), EncodedPair([4], [1], [5, 6, 7, 8], [0, 1, 1, 1])]
    (ids, mask), labels = pair_rows(pairs, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [1, 2, 0, 0], [4, 0, 0, 0], [5, 6, 7, 8]]
    assert mask.sum(1).tolist() == [3, 2, 1, 4] and labels.tolist() == [1, 0, 1, 0]
    assert pair_metrics([2.0, 0.0, 1.0], [1.0, 0.0, -1.0]) == {
        "accuracy": 2 / 3,  # a tie is not a win (TRL counts chosen > rejected)
        "margin": 1.0,
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
    }


def test_reward_recipe_prepares_a_one_label_classifier_with_the_tokenizers_pad(model_dir, tmp_path):
    train = _pairs_file(tmp_path / "train.jsonl", GOOD_PAIRS)
    data = _prepared("reward", "--model", str(model_dir), "--train", str(train), "--eval", str(train))
    assert (data.task, data.source.config.num_labels, data.source.config.pad_token_id) == ("reward", 1, 1)
    assert data.num_train_examples == 4 and "4 train / 4 eval pairs" in data.describe()
    (ids, mask), labels = data.train_batch([0, 1], 0, None)
    assert ids.shape[0] == 4 and labels.tolist() == [1, 0, 1, 0]
    assert ids[0].tolist() != ids[1].tolist() and bool((ids[mask == 1] != 1).all())  # no real token is the pad


@pytest.mark.parametrize(
    ("records", "extra", "message"),
    [
        ([{"prompt": "what is two ?", "chosen": "six ."}], (), "no 'rejected' field"),
        ([{"prompt": "what is two ?", "chosen": "six .", "rejected": "six ."}], (), "are identical"),
        (GOOD_PAIRS, ("--seq-len", "6"), "the prompt alone is"),
        (GOOD_PAIRS, ("--schedule", "dualpipev"), "reward training runs under 1f1b"),
    ],
    ids=["missing-side", "chosen-is-rejected", "prompt-too-long", "dualpipev"],
)
def test_bad_pairs_are_refused_before_any_rank_starts(model_dir, tmp_path, records, extra, message):
    train = _pairs_file(tmp_path / "train.jsonl", records)
    with pytest.raises(PptkError, match=message):
        _prepared("reward", "--model", str(model_dir), "--train", str(train), "--eval", str(train), *extra)


def test_reward_needs_held_out_pairs(model_dir, tmp_path):
    train = _pairs_file(tmp_path / "train.jsonl", GOOD_PAIRS)
    with pytest.raises(PptkError, match="give held-out pairs: --eval FILE or --eval-fraction"):
        _prepared("reward", "--model", str(model_dir), "--train", str(train))


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def test_a_decoder_classifier_pads_with_eos_when_the_tokenizer_has_no_pad(model_dir, tmp_path):
    no_pad = tmp_path / "no-pad"
    _tokenizer(pad=False).save_pretrained(no_pad)
    data_file = _csv(tmp_path / "data.csv", [("yes good", "good"), ("no bad", "bad")])
    files = ("--train", str(data_file), "--eval", str(data_file), "--task", "sequence-classification")
    data = _prepared("bert_finetune", "--model", str(model_dir), "--tokenizer", str(no_pad), *files)
    assert data.tokenizer.pad_token == "<|endoftext|>" and data.source.config.pad_token_id == 0
    (inputs, labels) = data.train_batch([0, 1], 0, None)
    assert len(inputs) == 2 and labels.tolist() == [1, 0]  # (input_ids, attention_mask): no segment ids

    neither = tmp_path / "neither"
    _tokenizer(pad=False, eos=False).save_pretrained(neither)
    with pytest.raises(PptkError, match="has neither a pad nor an eos token"):
        _prepared("bert_finetune", "--model", str(model_dir), "--tokenizer", str(neither), *files)


def test_a_decoder_classifier_refuses_rows_hugging_face_would_score_elsewhere(model_dir, tmp_path):
    bad = _csv(tmp_path / "bad.csv", [("yes good", "good"), ("no bad <pad>", "bad")])
    files = ("--train", str(bad), "--eval", str(bad), "--task", "sequence-classification")
    with pytest.raises(PptkError, match=r"bad.csv:3: the last token is the pad token \(id 1\)"):
        _prepared("bert_finetune", "--model", str(model_dir), *files)
    pair = tmp_path / "pair.csv"
    pair.write_text("text,other,label\nyes,good,good\nno,bad,bad\n")
    with pytest.raises(PptkError, match="--text-pair-column: llama has no segment ids"):
        _prepared(
            "bert_finetune", "--model", str(model_dir), "--train", str(pair), "--eval", str(pair),
            "--task", "sequence-classification", "--text-pair-column", "other",
        )  # fmt: skip
    with pytest.raises(PptkError, match="llama models support causal-lm, reward, sequence-classification; drop --task"):
        _prepared("bert_finetune", "--model", str(model_dir), "--task", "token-classification", *files[:4])


def test_the_pad_token_embedding_row_follows_hugging_face(model_dir, tmp_path):
    """With pad = eos (the default), config.pad_token_id is eos, and Llama's embedding gives that row no gradient in
    Hugging Face and in the pipeline alike (the pipeline reads padding_idx from the family's own model)."""
    from pptk.models.heads import config_for_task
    from pptk.parallel.pipeline import plan_pipeline

    config = config_for_task(
        LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        "sequence-classification",
    )
    plan = plan_pipeline(config, num_stages=1, task="sequence-classification")
    embed = plan.layers[0].spec.build()
    assert embed.padding_idx == config.pad_token_id == config.eos_token_id
    assert torch.equal(embed.weight[embed.padding_idx], torch.zeros(16))
