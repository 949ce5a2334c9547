# Mixture-of-experts causal LMs on the pipeline, in one process: the training loss (router load-balancing term
# included) equals Hugging Face's, the router sums cross stage boundaries as DeepSpeed sends them, and activation
# checkpointing does not count them twice.
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig

from pptk.errors import PptkError
from pptk.models import get_family, supported_model_types
from pptk.models.decoder_families import MOE_FAMILIES, SMALL_COMMON
from pptk.models.moe import RouterSums, load_balancing_loss
from pptk.models.protocol import StageTensors
from pptk.parallel.hf_weights import hf_names
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

MOE = sorted(t for t, family in MOE_FAMILIES.items() if family.moe == "switch")
EAGER_ONLY = {"gpt_oss"}  # attention sinks: transformers has no SDPA path for them
SEQ_LEN = 24


def padded_batch(config, *, lengths=(SEQ_LEN, 17, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), SEQ_LEN), generator=gen)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    return input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)


def small(model_type: str, **override):
    config = get_family(model_type).small_config()
    for name, value in override.items():
        setattr(config, name, value)
    return config


def pipeline_and_reference(config, *, num_stages: int = 2, dtype=torch.float32):
    """The sequential pipeline holding exactly the weights of a random Hugging Face model (copied in memory: see
    DENSE in test_decoder.py for why not through a checkpoint)."""
    attn = "eager" if config.model_type in EAGER_ONLY else "sdpa"
    plan = plan_pipeline(config, num_stages=num_stages, dropout=False, attn_implementation=attn)
    torch.manual_seed(0)
    reference = plan.hf_class(plan.config)
    pipe = build_sequential_module(plan)
    state = reference.state_dict()
    names = hf_names(pipe, plan.layers)
    pipe.load_state_dict({key: state[name] for key, name in names.items()})
    return plan, pipe.to(dtype).train(), reference.to(dtype).train()


def run_stages(plan, pipe, inputs, *, wrap=None, boundaries=None):
    """The layers stage by stage, as DeepSpeed runs them: each stage receives fresh leaves (floats requiring grad),
    and backward() sends every received float tensor's gradient to the stage before. Returns the last output,
    backward() and what crossed each boundary. boundaries: the plan's, unless given."""
    boundaries = boundaries or plan.stages.boundaries
    num_stages = len(boundaries) - 1
    stage_io = []
    received = inputs
    for s in range(num_stages):
        outputs = received
        for index in range(boundaries[s], boundaries[s + 1]):
            func = pipe.forward_funcs[index]
            block = plan.layers[index].role == "block"
            outputs = wrap(func, outputs) if wrap and block else func(outputs)
        stage_io.append((received, outputs))
        if s + 1 < num_stages:
            received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in outputs)

    def backward(loss):
        loss.backward()
        for s in range(num_stages - 2, -1, -1):
            _, sent = stage_io[s]
            arrived, _ = stage_io[s + 1]
            floats = [(out, into) for out, into in zip(sent, arrived, strict=True) if out.is_floating_point()]
            for _, into in floats:  # DeepSpeed asserts this: every float tensor it received must get a gradient
                assert into.grad is not None
            torch.autograd.backward([out for out, _ in floats], [into.grad for _, into in floats])

    crossed = [stage_io[s][1] for s in range(num_stages - 1)]
    return stage_io[-1][1], backward, crossed


def moe_layers(config) -> list[int]:
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return [i for i in range(config.num_hidden_layers) if i not in dense]


@pytest.mark.parametrize("model_type", MOE)
def test_loss_with_router_term_and_gradients_match_hugging_face_across_stages(model_type):
    plan, pipe, reference = pipeline_and_reference(small(model_type))
    input_ids, attention_mask, labels = padded_batch(plan.config)
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    out.loss.backward()

    # embedding + layer 0 | layers 1-2 | layer 3, norm, head: qwen3_moe's dense layer 0 sends no sums yet
    boundaries = (0, 2, 4, len(plan.layers))
    output, backward, crossed = run_stages(plan, pipe, (input_ids, attention_mask), boundaries=boundaries)
    loss = plan.loss_fn()(output, labels)
    backward(loss)

    logits, *sums = output
    aux = load_balancing_loss(RouterSums.check(*sums), num_experts=reference.num_experts)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-6, atol=0)
    assert abs(loss.item() - out.loss.item()) <= 1e-6 * out.loss.item()
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    # the term is the family's own coefficient (OLMoE 0.01) times the pooled product, with the model's expert count
    router = plan.loss_fn().keywords["router"]
    assert (router.coef, router.num_experts) == (reference.router_aux_loss_coef, reference.num_experts) != (0, 0)
    assert router.coef == (0.01 if model_type in ("olmoe", "flex_olmo") else 0.001)
    assert aux.item() > 1.5  # about top_k (2) when balanced: the term adds coef x 2 to the loss
    assert (output[1] > 0).all() and output[1].max() < output[1].sum() / 2  # routing is not degenerate

    # what crossed: hidden/mask/positions, plus the sums once a MoE layer has run before the boundary
    first_moe = min(moe_layers(plan.config)) + 1  # layer index of the first MoE block (after the embedding)
    for boundary, sent in zip(boundaries[1:], crossed, strict=False):
        assert len(sent) == (6 if boundary > first_moe else 3), (boundary, [t.dtype for t in sent])
        StageTensors.from_tuple(sent)
    assert {len(sent) for sent in crossed} == ({3, 6} if model_type == "qwen3_moe" else {6})  # layer 0 dense
    # the sums that crossed the last boundary are a part of the total, and the product of parts is no sum of terms
    partial = RouterSums.check(*crossed[-1][3:])
    assert 0 < int(partial.tokens) < int(output[3])
    assert abs(load_balancing_loss(partial, num_experts=4).item() - out.aux_loss.item()) > 1e-4

    router_class = plan.hf_class._can_record_outputs["router_logits"].target_class
    routers = {
        f"{module_name}.{name}"
        for module_name, module in reference.named_modules()
        if isinstance(module, router_class)
        for name, _ in module.named_parameters()
    }
    assert routers and all(reference.get_parameter(n).grad.abs().max() > 0 for n in routers)

    hf_params = dict(reference.named_parameters())
    names = hf_names(pipe, plan.layers)
    checked = set()
    for key, param in pipe.named_parameters():
        name = names[key]
        torch.testing.assert_close(param.grad, hf_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        checked.add(name)
    assert checked == set(hf_params) and routers < checked
    assert any(".experts." in n for n in checked)


def test_padding_is_left_out_of_the_router_sums():
    plan, pipe, _ = pipeline_and_reference(small("mixtral"), num_stages=1)
    input_ids, attention_mask, _ = padded_batch(plan.config)
    _, counts, probs, tokens = pipe((input_ids, attention_mask))
    real = int(attention_mask.sum())
    layers = plan.config.num_hidden_layers
    assert int(tokens) == real * layers and int(counts.sum()) == real * layers * 2  # top-2
    torch.testing.assert_close(probs.sum(), torch.tensor(float(real * layers)))  # each token's softmax sums to 1
    other = input_ids.masked_fill(attention_mask == 0, 7)  # other ids behind the padding: same sums
    _, counts2, probs2, _ = pipe((other, attention_mask))
    assert torch.equal(counts, counts2)
    torch.testing.assert_close(probs, probs2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpoint_recomputation_counts_once(use_reentrant):
    plan, pipe, _ = pipeline_and_reference(small("qwen2_moe"), num_stages=2)
    input_ids, attention_mask, labels = padded_batch(plan.config)

    def loss_and_grads(wrap):
        pipe.zero_grad()
        output, backward, _ = run_stages(plan, pipe, (input_ids, attention_mask), wrap=wrap)
        loss = plan.loss_fn()(output, labels)
        backward(loss)
        return loss.detach(), output[1:], {n: p.grad.clone() for n, p in pipe.named_parameters()}

    def checkpointed(func, inputs):  # tensors passed one by one, as DeepSpeed's pipeline checkpoints a layer range
        return checkpoint(lambda *tensors: func(tensors), *inputs, use_reentrant=use_reentrant)

    loss, sums, grads = loss_and_grads(None)
    loss_ckpt, sums_ckpt, grads_ckpt = loss_and_grads(checkpointed)
    assert loss_ckpt.item() == loss.item()
    assert loss_and_grads(checkpointed)[0].item() == loss.item()  # nothing carried over from the recomputation
    assert torch.equal(sums[0], sums_ckpt[0]) and torch.equal(sums[2], sums_ckpt[2])
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-7, msg=name)
    # the per-call hooks are gone after each block call
    routers = [m for m in pipe.modules() if type(m).__name__.endswith("TopKRouter")]
    assert routers and not any(m._forward_hooks for m in routers)


@pytest.mark.parametrize("model_type", MOE)
def test_bf16_loss_is_close_to_hugging_face(model_type):
    """bf16: the loss within 1e-3 relative, the router term within 2e-3 (seen: < 1e-4 and < 5e-4)."""
    plan, pipe, reference = pipeline_and_reference(small(model_type), num_stages=2, dtype=torch.bfloat16)
    input_ids, attention_mask, labels = padded_batch(plan.config)
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    output, _, _ = run_stages(plan, pipe, (input_ids, attention_mask))
    loss = plan.loss_fn()(output, labels)
    aux = load_balancing_loss(RouterSums.check(*output[1:]), num_experts=4)
    assert output[2].dtype == torch.float32  # the probability sums stay fp32 on the wire
    torch.testing.assert_close(aux, out.aux_loss.float(), rtol=2e-3, atol=0)
    assert abs(loss.item() - out.loss.item()) <= 1e-3 * out.loss.item()


@pytest.mark.parametrize("model_type", MOE)
def test_without_output_router_logits_no_router_term_like_hugging_face(model_type):
    plan, pipe, reference = pipeline_and_reference(small(model_type, output_router_logits=False), num_stages=2)
    input_ids, attention_mask, labels = padded_batch(plan.config)
    output = pipe((input_ids, attention_mask))
    assert isinstance(output, torch.Tensor)  # no sums travel
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.aux_loss is None
    assert abs(plan.loss_fn()(output, labels).item() - out.loss.item()) <= 1e-6 * out.loss.item()


def test_deepseek_v3_adds_no_router_loss_like_hugging_face():
    plan, pipe, reference = pipeline_and_reference(small("deepseek_v3", output_router_logits=True), num_stages=2)
    input_ids, attention_mask, labels = padded_batch(plan.config)
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    output = pipe((input_ids, attention_mask))
    assert isinstance(output, torch.Tensor) and plan.loss_fn().keywords["router"] is None
    loss = plan.loss_fn()(output, labels)
    assert abs(loss.item() - out.loss.item()) <= 1e-6 * out.loss.item()
    loss.backward()
    out.loss.backward()
    names = hf_names(pipe, plan.layers)
    hf_params = dict(reference.named_parameters())
    for key, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[names[key]].grad, rtol=1e-5, atol=1e-7, msg=names[key])


def test_moe_families_are_listed_and_others_refused():
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"} <= set(supported_model_types())
    with pytest.raises(PptkError, match="mixture-of-experts blocks are supported only for"):
        plan_pipeline(AutoConfig.for_model("llama", **SMALL_COMMON, num_local_experts=4), num_stages=2)
    for unfit in ("jetmoe", "phimoe", "qwen3_next"):
        with pytest.raises(PptkError, match="has no pptk family module"):
            get_family(unfit)


def test_a_router_loss_without_router_sums_is_refused():
    config = copy.deepcopy(small("qwen2_moe"))
    plan = plan_pipeline(config, num_stages=1)
    logits = torch.randn(1, 4, config.vocab_size)
    with pytest.raises(PptkError, match="no router sums"):
        plan.loss_fn()(logits, torch.ones(1, 4, dtype=torch.long))


def test_tensor_parallelism_is_refused_for_every_moe_family():
    for model_type in MOE_FAMILIES:
        with pytest.raises(PptkError, match=r"--tp 2: .* mixture of experts"):
            plan_pipeline(model_type, num_stages=2, tp=2, attn_implementation="eager")
