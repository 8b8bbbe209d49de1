"""The parameters that require grad but get no gradient from the loss, read from the model code.

Whether autograd reaches a parameter from the loss is a fact of the model's forward: transformers
5.25 runs DeepSeek-V3.2's DSA indexer (DeepseekV32Indexer.forward) under `@torch.no_grad`, so
its wq_b, wk, k_norm and weights_proj require grad, sit in the optimizer's param_groups, and
never get a `.grad`. One forward + loss + backward of the model built under FakeTensorMode (no
memory, any size) finds them: a parameter whose `.grad` is still None after the backward.

The model is the class and config memplan.verify.trace.meta builds the inventory from (so the
names are the inventory's), in bf16, in train mode, at batch 2 and the trace's shortest
sequence (memplan.verify.trace.sizes.sequence_unit); a model whose bf16 forward fails runs in
fp32 instead (XLNet's relative attention makes its weights with `torch.FloatTensor`, fp32
whatever the build dtype, modeling_xlnet.py::XLNetRelativeAttention.__init__, and `einsum`
refuses them beside bf16 activations). Which parameters the loss reaches does not depend on
the dtype. As in the profile trace, two layers of each
structure run in their places and the others are stood in for (memplan.verify.trace.structure:
`plan`, `keeping`): a stood-in layer's parameters get what those of the first traced layer of
its group get (the two traced layers must agree). An encoder-decoder runs every layer.

A model this cannot run (no loss: a base model; a forward fake tensors refuse, e.g. experts whose
sizes depend on the routing) keeps every parameter that requires grad counted with a gradient,
and its inventory says so in a note.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memplan.model.inventory import fold_name
from memplan.verify.trace import heads, masks, realrun, structure
from memplan.verify.trace import values as values_
from memplan.verify.trace.forward import any_layers, building, cpu_kernels, text_config
from memplan.verify.trace.sizes import sequence_unit

BATCH = 2
"""Sequences in the fake batch (batch 1 takes other code paths in some models' losses)."""


def without_gradient(cls: Any, hf_config: Any) -> tuple[tuple[str, ...], str]:
    """(the names of the parameters of `cls` built from `hf_config` that require grad and whose
    `.grad` stays None after one forward + loss + backward, a note for the inventory: what was
    found, or why nothing could be)."""
    name = getattr(cls, "__name__", str(cls))
    try:
        try:
            found = _run(cls, hf_config, torch.bfloat16)
        except Exception:  # noqa: BLE001 - a model that mixes dtypes in bf16: run it in fp32
            found = _run(cls, hf_config, torch.float32)
    except Exception as err:  # noqa: BLE001 - any failure of the model code under fake tensors
        text = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        return (), (
            f"which parameters get a gradient was not derived (one fake forward + backward of "
            f"{name} failed: {text}): every parameter that requires grad is counted with one."
        )
    if found is None:
        return (), (
            f"which parameters get a gradient was not derived ({name} has no loss the trace "
            "runs): every parameter that requires grad is counted with one."
        )
    if not found:
        return (), ""
    folded = sorted({fold_name(n) for n in found})
    shown = ", ".join(folded[:6]) + (", ..." if len(folded) > 6 else "")
    return tuple(found), (
        f"{len(found)} parameters require grad but get no gradient from the loss (one fake "
        f"forward + backward of {name}: their `.grad` stays None), so no gradient and no "
        f"torch.optim state: {shown}."
    )


def _run(cls: Any, hf_config: Any, dtype: torch.dtype) -> list[str] | None:
    """The names, in `named_parameters()` order; None for a model with no loss to run (a base
    model: its gradients depend on the loss the user puts on it)."""
    # as the profile trace runs it (forward.trace_once): an encoder-decoder as a language model
    kind = heads.kind_of_name(cls.__name__)
    if kind is None and (
        getattr(hf_config, "is_encoder_decoder", False) or _causal_lm(cls, hf_config)
    ):
        kind = "lm"
    if kind is None:
        return None
    mode = FakeTensorMode()
    with mode, building(mode):
        model = cls._from_config(hf_config, dtype=dtype)
    model.train()
    text = text_config(model.config)  # an image-text model: its text decoder's layers
    depth = int(getattr(text, "num_hidden_layers", 0) or len(any_layers(model)))
    found = structure.layer_lists(model, depth)  # as the profile trace finds them
    layers = torch.nn.ModuleList(found.modules)
    prefixes = [f"{p}.{j}." for p, stack in found.lists for j in range(len(stack))]
    if found.encoder_decoder:  # every layer runs (a T5 block hands its bias to the next)
        plan = structure.plan(layers, None, keep_all=True)
    else:
        plan = structure.plan(layers, getattr(text, "layer_types", None))
    swapped = [stack for _, stack in found.lists]
    shape = (BATCH, sequence_unit(text))
    values = values_.Values()  # the ids' values, for code that reads them (values.py)
    real_ids = torch.zeros(shape, dtype=torch.int64)
    with (
        mode,
        cpu_kernels(),
        masks.real_tensor_masks(),
        realrun.real_runs(model, mode),
        values,
        structure.keeping(swapped, plan),
    ):
        ids = values.seed(torch.zeros(shape, dtype=torch.int64), real_ids)
        labels = int(getattr(model.config, "num_labels", 2))
        out = model(input_ids=ids, use_cache=False, **heads.loss_inputs(kind, ids, labels))
        loss = getattr(out, "loss", None)
        del out
        if loss is None:
            return None
        loss.backward()
    missing = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    if not plan.keep_all:
        missing = _stood_in(missing, plan, prefixes)
    for p in model.parameters():
        p.grad = None
    order = [n for n, _ in model.named_parameters()]
    return [n for n in order if n in missing]


def _causal_lm(cls: Any, hf_config: Any) -> bool:
    """Whether `cls` is the class transformers' AutoModelForCausalLM builds for `hf_config`,
    whatever its name: an image-text model's ForConditionalGeneration (Gemma 3, GOT-OCR2), which
    verify builds and steps with `labels` (memplan/verify/build.py) as the trace runs it
    (forward.trace_once: a class no head names is a language model)."""
    import transformers

    mapping: Any = transformers.AutoModelForCausalLM._model_mapping
    return type(hf_config) in mapping and mapping[type(hf_config)] is cls


def _stood_in(missing: set[str], plan: structure.Plan, prefixes: list[str]) -> set[str]:
    """`missing` with each stood-in layer's parameters given what its group's first traced
    layer's got (a stood-in layer never ran: all of its are in `missing`)."""
    names = {n for n in missing if not any(n.startswith(p) for p in prefixes)}
    for group in plan.groups:
        traced = [
            {n[len(prefixes[i]) :] for n in missing if n.startswith(prefixes[i])}
            for i in group.traced
        ]
        if any(t != traced[0] for t in traced):
            raise ValueError(
                f"the two traced layers of kind {group.kind} get gradients for different "
                f"parameters: {sorted(traced[0] ^ traced[-1])}"
            )
        for i in group.layers:
            names |= {prefixes[i] + rel for rel in traced[0]}
    return names
