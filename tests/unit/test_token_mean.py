# The step's loss as the mean over every counted token (pptk.training.token_mean), computed the way DeepSpeed's
# pipeline engine combines micro-batches: each micro-batch's loss, averaged over grad_accum x dp.
import pytest
import torch
from transformers import AutoConfig

from pptk.models.heads import get_task
from pptk.training.token_mean import TokenMeanLoss, shifted_items, unshifted_items

VOCAB = 11


def _micro_batches(seed: int, *, counts: list[int], shift: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per micro-batch, with ``counts[i]`` counted labels in micro-batch i (uneven on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for count in counts:
        logits = torch.randn(2, 8, VOCAB, generator=generator)
        labels = torch.full((2, 8), -100)
        flat = labels.view(-1)
        positions = torch.randperm(16 - 2, generator=generator)[:count] + (1 if shift else 0)
        flat[positions] = torch.randint(0, VOCAB, (count,), generator=generator)
        if shift:
            labels[:, 0] = -100  # the first column is never a target after the shift
        batches.append((logits, labels))
    return batches


def _token_mean(batches, *, shift: bool) -> torch.Tensor:
    """What Hugging Face's Trainer computes: every counted token's cross-entropy, summed, over their count."""
    total, count = torch.tensor(0.0), 0
    for logits, labels in batches:
        scores, targets = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
        total = total + torch.nn.functional.cross_entropy(
            scores.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        count += int((targets != -100).sum())
    return total / count


@pytest.mark.parametrize(("task", "shift"), [("causal-lm", True), ("masked-lm", False)])
def test_the_engines_mean_of_micro_batch_losses_is_the_global_token_mean(task, shift):
    config = AutoConfig.for_model("gpt2" if shift else "bert", vocab_size=VOCAB)
    loss = TokenMeanLoss(get_task(task).loss(config), shifted_items if shift else unshifted_items)
    replicas = [_micro_batches(0, counts=[1, 9, 4], shift=shift), _micro_batches(1, counts=[12, 0, 2], shift=shift)]
    every = [batch for replica in replicas for batch in replica]
    loss.begin_step(total_items=loss.local_items(every), micro_batches=len(every))
    engine_mean = torch.stack([loss(logits, labels) for logits, labels in every]).mean()  # over grad_accum and dp
    assert engine_mean.item() == pytest.approx(_token_mean(every, shift=shift).item(), rel=1e-6)
    per_micro_batch = torch.stack([get_task(task).loss(config)(lg, lb) for lg, lb in every if (lb != -100).any()])
    assert per_micro_batch.mean().item() != pytest.approx(engine_mean.item(), rel=1e-3)  # the bias this removes


def test_a_micro_batch_without_a_counted_token_adds_zero_not_nan():
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB)
    loss = TokenMeanLoss(get_task("causal-lm").loss(config), shifted_items)
    (logits, labels), *_ = _micro_batches(0, counts=[0], shift=True)
    loss.begin_step(total_items=0, micro_batches=1)
    assert loss(logits, labels).item() == 0.0
