# The Hugging Face side of `pptk verify`: the batch the ranks read and Hugging Face's own step on it.
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from pptk.errors import PptkError
from pptk.models.heads import SCORED_LAST_TOKEN, synthetic_labels
from pptk.parallel.hf_weights import HFCheckpoint
from pptk.parallel.lora import LoraSettings
from pptk.parallel.pipeline import pipeline_inputs
from pptk.verify.lora import ADAPTER_FILE, adapter_numel, add_reference_adapters, rename_reference

LEARNING_RATE = 1.0  # one SGD step with lr=1: the parameters after it differ from the start by the gradient


def synthetic_batch(plan, *, batch_size: int, seq_len: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Right-padded random batch: row lengths vary (first row full), non-zero token types where the model has them."""
    gen = torch.Generator().manual_seed(seed)
    config = plan.config
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    pad_id = getattr(config, "pad_token_id", None) or 0
    if plan.task in SCORED_LAST_TOKEN:  # no real token is the pad id: Hugging Face pools the last non-pad token
        input_ids = input_ids.masked_fill(input_ids == pad_id, (pad_id + 1) % config.vocab_size)
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in pipeline_inputs(plan):
        types = max(1, getattr(config, "type_vocab_size", 1))
        inputs["token_type_ids"] = torch.randint(0, types, (batch_size, seq_len), generator=gen) * attention_mask
    labels = synthetic_labels(
        plan.task, input_ids=input_ids, attention_mask=attention_mask, config=config, generator=gen
    )
    return inputs, labels


def micro_batches(inputs: dict, labels: torch.Tensor, names: tuple[str, ...], size: int):
    for start in range(0, labels.shape[0], size):
        yield tuple(inputs[n][start : start + size] for n in names), labels[start : start + size]


def reference_step(
    plan,
    *,
    work: Path,
    dp: int,
    precision: str,
    accum: torch.dtype,
    micro_batch_size: int,
    micro_batch_count: int,
    seq_len: int,
    seed: int,
    max_shard_size: str | None = None,
    lora: LoraSettings | None = None,
) -> dict:
    """Save the model and the batch the ranks will read under ``work``, and run Hugging Face's step on them.

    The step: every micro-batch forward and backward, the loss scaled as DeepSpeed scales it, gradients accumulated
    in ``accum`` as DeepSpeed accumulates them, one SGD step with lr=1 on fp32 master weights. In bf16 the model is
    loaded with dtype=bfloat16, as Hugging Face users do, and the same step in fp32 on its rounded weights measures
    each tensor's rounding noise. With ``lora``, the step is peft's on the same model, with the non-zero adapters
    saved for the ranks (pptk.verify.lora).
    """
    work.mkdir(parents=True, exist_ok=True)
    hf_class = plan.hf_class
    torch.manual_seed(seed)
    loading: dict[str, list[str]] = {"missing_keys": [], "unexpected_keys": []}
    if plan.source.pretrained_dir is not None:
        HFCheckpoint(plan.source.pretrained_dir)  # pptk's own checks first: a bad index or header is one line
        try:
            model, info = hf_class.from_pretrained(
                plan.source.pretrained_dir, config=plan.config, output_loading_info=True
            )
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # how truncation and shapes surface
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PptkError(
                f"Hugging Face cannot load {plan.source.pretrained_dir}: {first}; the weights are truncated or do not "
                "match its config.json (download or save them again)"
            ) from None
        loading = {key: sorted(info.get(key) or []) for key in loading}
    else:
        model = hf_class(plan.config)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(work / "hf", **shards)  # the ranks load their stages from here, tensor by tensor
    reference = {"num_parameters": model.num_parameters(), **loading}
    if lora is not None:
        model, adapters = add_reference_adapters(model, plan, lora, seed=seed)
        save_file(adapters, work / ADAPTER_FILE, metadata={"format": "pt"})
        reference["num_parameters"] += adapter_numel(adapters)
    inputs, labels = synthetic_batch(
        plan, batch_size=micro_batch_size * micro_batch_count * dp, seq_len=seq_len, seed=seed
    )
    torch.save({"inputs": inputs, "labels": labels}, work / "batch.pt")
    step = dict(
        plan=plan, inputs=inputs, labels=labels, micro_batch_size=micro_batch_size, total=micro_batch_count * dp
    )
    if precision == "bf16":
        low = hf_class.from_pretrained(work / "hf", config=plan.config, dtype=torch.bfloat16)
        if lora is not None:
            low = add_reference_adapters(low, plan, lora, state=adapters)[0]
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())  # the exact step at the weights both bf16 runs use
        exact_loss, exact_grads = _hf_step(model, accum=torch.float32, **step)
        model = low
    loss, grads = _hf_step(model, accum=accum, **step)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    reference |= {"loss": loss, "start": start, "params": {n: start[n] - LEARNING_RATE * grads[n] for n in start}}
    if precision == "bf16":
        reference["noise"] = {n: (grads[n] - exact_grads[n]).norm().item() for n in grads}
        reference["loss_noise"] = abs(loss - exact_loss)
    return reference if lora is None else rename_reference(reference, model)


def _hf_step(
    model, *, plan, inputs: dict, labels: torch.Tensor, micro_batch_size: int, total: int, accum: torch.dtype
) -> tuple[float, dict[str, torch.Tensor]]:
    """(mean micro-batch loss, fp32 gradients) of one step; the loss is the task's, as on the pipeline's last stage
    (Hugging Face's own loss functions: BERT's built-in loss would compute cross-entropy in bf16)."""
    model.train()
    loss_fn = dataclasses.replace(plan, vocab=None).loss_fn()  # whole logits here, whatever the pipeline's tp
    # a MoE family's router term: Hugging Face's own aux_loss, added as <Family>ForCausalLM.forward adds it
    router = getattr(loss_fn, "keywords", {}).get("router")
    token_loss = partial(loss_fn, router=None) if router is not None else loss_fn
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p, dtype=accum) for n, p in params.items()}
    losses = []
    names = tuple(inputs)
    for micro_inputs, micro_labels in micro_batches(inputs, labels, names, micro_batch_size):
        model.zero_grad(set_to_none=True)
        output = model(**dict(zip(names, micro_inputs)))
        loss = token_loss(output.logits, micro_labels)
        if router is not None:
            loss = loss + router.coef * output.aux_loss.float()
        (loss / total).backward()  # DeepSpeed: mean over micro-batches, then mean over replicas
        losses.append(loss.item())
        for n, p in params.items():
            if p.grad is not None:
                grads[n] += p.grad.to(accum)
    return sum(losses) / len(losses), {n: g.float() for n, g in grads.items()}
