"""Build a model under fake tensors and record what one forward and its loss save for backward
(memplan.verify.trace.profile fits those records into a profile).

The model is built at full depth with transformers' `AutoModelForCausalLM.from_config` (or the
head class config.json names) inside torch's FakeTensorMode (parameters are fake tensors: no
memory, any size), put in train mode, and run forward + loss under
`torch.autograd.graph.saved_tensors_hooks`. Each saved storage is recorded once, under the
first module that saves it, parameters and buffers excluded (the contract of
memplan.model.forward.tensors; fake tensors have no data pointer, so a storage is known by its
StorageImpl, `_cdata`), and counted when a saved tensor still holds it at the end of the
forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import MemplanError
from memplan.verify import selective as selective_
from memplan.verify.build import force_dropout
from memplan.verify.trace import autocast as autocast_
from memplan.verify.trace import cpu, cuda, heads, masks, moe, realrun, structure
from memplan.verify.trace import fit as fit_
from memplan.verify.trace import recompute as recompute_
from memplan.verify.trace import values as values_
from memplan.verify.trace import working as working_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.uint64: "uint64",
    torch.complex64: "complex64",
}


def build_fake(
    config: Mapping[str, Any],
    *,
    stream: str,
    attention: str,
    checkpointing: str,
    dropout: bool | None = None,
) -> tuple[torch.nn.Module, FakeTensorMode]:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    kwargs.pop("torch_dtype", None)
    kwargs.pop("dtype", None)
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    except (KeyError, ValueError) as err:
        raise MemplanError(
            f"transformers cannot build model_type {config.get('model_type')!r}: {err}"
        ) from None
    force_dropout(cfg, dropout)  # training.dropout, as verify applies it
    seq2seq = _as_seq2seq(config, cfg)  # the decoder as long as the encoder
    head = transformers.AutoModelForSeq2SeqLM.from_config if seq2seq else head_constructor(config)
    # `sdpa` is transformers' default, as verify builds it (memplan/verify/build.py::
    # build_model): sdpa where the class supports it, else eager (gpt_oss: attention sinks).
    impl = {"attn_implementation": "eager"} if attention == "eager" else {}
    mode = FakeTensorMode()
    with mode, building(mode):
        model = head(cfg, dtype=DTYPES[stream], **impl)
    if moe.is_moe(cfg):
        moe.check(model, stream)
    model.train()
    if checkpointing == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, mode


@contextlib.contextmanager
def building(mode: FakeTensorMode) -> Iterator[None]:
    """Build a transformers model under `mode` as on the meta device, where the inventory is
    built (memplan.verify.trace.meta.build_model):

    - no weight initialization: transformers 5.25 skips `initialize_weights` on the meta
      device (modeling_utils.py::PreTrainedModel.init_weights; tying still runs), and fake
      tensors have no values to initialize, while some initializers read them (torch 2.13's
      nn/init.py::_no_grad_trunc_normal_ resamples `while mask.any()`, a data-dependent
      `aten._local_scalar_dense` under FakeTensorMode: BLT, Gemma 3's SigLIP, ModernBERT);
    - a module's `.to(dtype)` works on fake parameters (DeepSeek-V4's fp32 norms, Inkling's
      Conv1d): torch 2.13's nn/modules/module.py::Module._apply moves a FakeTensor parameter
      with `torch.utils.swap_tensors`, which refuses a tensor any weakref points to, and
      FakeTensorConverter.from_meta_and_device (torch/_subclasses/fake_tensor.py) memoizes
      the op outputs it wraps in a WeakValueDictionary (pytorch/pytorch#148977, fixed upstream
      only after 2.13 by #185595). The memo's entries for the two tensors are dropped before
      the swap: the memo maps a meta tensor the converter saw to its fake one, and the swap
      keeps both Python objects, so no later lookup changes."""
    import torch.utils
    from transformers.modeling_utils import PreTrainedModel

    memo = mode.fake_tensor_converter.tensor_memo
    swap = torch.utils.swap_tensors
    initialize = PreTrainedModel.initialize_weights

    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        for t in (t1, t2):
            # a WeakValueDictionary's KeyedRef knows its key (no reference to it kept here)
            keys = [getattr(ref, "key", None) for ref in weakref.getweakrefs(t)]
            for key in keys:
                if key is not None and memo.get(key) is t:
                    del memo[key]
        swap(t1, t2)  # type: ignore[no-untyped-call]

    torch.utils.swap_tensors = swap_tensors
    PreTrainedModel.initialize_weights = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap
        PreTrainedModel.initialize_weights = initialize  # type: ignore[method-assign]


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """The CPU kernels' outputs where the fake kernels' differ (memplan.verify.trace.cpu), and
    fp32 grouped GEMMs (memplan.verify.trace.moe.CpuGroupedMm), for device=cpu traces."""
    with cpu.CpuKernels(), moe.CpuGroupedMm():
        yield


def _as_seq2seq(config: Mapping[str, Any], cfg: Any) -> bool:
    """Whether the trace runs an encoder-decoder config as its seq2seq LM: where
    `architectures` names the seq2seq class, or names none and transformers has no causal LM
    for it (T5). BART, Marian, Whisper, ... otherwise build their decoder-only ForCausalLM, the
    class the inventory (meta.py::_model_class: architectures, then AutoModelForCausalLM
    first) and verify (memplan/verify/build.py) build, so the trace describes the same model."""
    if not getattr(cfg, "is_encoder_decoder", False):
        return False
    mapping: Any = transformers.AutoModelForSeq2SeqLM._model_mapping
    seq2seq: Any = mapping[type(cfg)] if type(cfg) in mapping else None
    names = [str(n) for n in config.get("architectures") or () if hasattr(transformers, str(n))]
    if names:
        return seq2seq is not None and names[0] == seq2seq.__name__
    return type(cfg) not in transformers.AutoModelForCausalLM._model_mapping


def head_constructor(config: Mapping[str, Any]) -> Any:
    """The class config.json's `architectures` names when it is a head the trace runs with its
    loss (memplan.verify.trace.heads: language-model, sequence and token classification,
    question answering), else AutoModelForCausalLM."""
    _, cls = heads.head_class(config)
    return cls._from_config if cls is not None else transformers.AutoModelForCausalLM.from_config


def text_config(cfg: Any) -> Any:
    """The config of the model's text decoder, where the trace reads its sizes: an image-text
    model's (Fuyu, GOT-OCR2, Gemma 3) holds them in its text sub-config
    (transformers/configuration_utils.py::PreTrainedConfig.get_text_config, decoder=True), a
    text model's is itself."""
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def position_limit(cfg: Any) -> int:
    """The longest sequence the config's position embeddings serve; 0 for no limit, which a
    config states with no key, 0, or a negative value: transformers 5.25's
    configuration_xlnet.py::XLNetConfig.max_position_embeddings is a property returning -1
    ("one of the few models that has no sequence length limit": relative positions)."""
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    return max(limit, 0)


def decoder_layers(model: torch.nn.Module, n: int) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers: the ModuleList of `n` modules holding the most parameters."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise MemplanError(f"no list of {n} layers found in {type(model).__name__}.")
    return best[1], best[2]


def trace_once(
    model: torch.nn.Module,
    mode: FakeTensorMode,
    *,
    batch: int,
    sequence: int,
    autocast: str | None,
    layer_count: int,
    device: str = "cpu",
    selective: bool = False,
    autocast_lists: str | None = None,
    softmax_input: bool = False,
    working: working_.Recorder | None = None,
) -> list[fit_.Record]:
    """One forward + loss; every saved storage once, with its block and module (device cuda:
    the CUDA kernels' tensors, memplan.verify.trace.cuda; cpu: the CPU kernels' where the
    fake ones differ, memplan.verify.trace.cpu). `selective`: every attention core
    checkpointed, then backward, whose recomputations are recorded as `recompute:<block>`
    (memplan.verify.trace.recompute). `autocast` runs torch's CPU autocast, or with device cuda
    CUDA's lists emulated (memplan.verify.trace.autocast); `autocast_lists` ("cpu", "cuda")
    forces the emulation with those lists. `softmax_input`: softmax and log_softmax keep their
    input too, as torch before 1.11 (SoftmaxInputs). `working`: the layers' working sets
    recorded there (memplan.verify.trace.working; then a backward runs too)."""
    found = structure.layer_lists(model, layer_count)
    lists = found.lists
    layers = [m for _, stack in lists for m in stack]
    paths = [f"{prefix}.{j}" for prefix, stack in lists for j in range(len(stack))]
    # after an encoder's last layer its final norm and the decoder's embeddings run: per forward
    ends = {
        id(stack[len(stack) - 1]): "embeddings"
        for _, stack in (lists[:-1] if found.encoder_decoder else ())
    }
    ends[id(layers[-1])] = "head"
    # A module several layers share (openai-gpt's `ACT_FNS[afn]`, one activation module in
    # every MLP: modeling_openai.py::MLP.__init__) has a path in each: the one under the
    # module that calls it, so each layer names it as its own.
    names: dict[torch.nn.Module, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, []).append(n)
    stack: list[str] = []
    state = {"block": "embeddings"}
    layer_of = {id(m): i for i, m in enumerate(layers)}
    hooks = []

    def pre(module: torch.nn.Module, *_: Any) -> None:
        paths_of = names.get(module, ["?"])
        under = f"{stack[-1]}." if stack else ""
        stack.append(next((n for n in paths_of if n.startswith(under)), paths_of[0]))
        if id(module) in layer_of:
            state["block"] = f"layer.{layer_of[id(module)]}"

    def post(module: torch.nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()
        if id(module) in ends:
            state["block"] = ends[id(module)]

    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))
    if working is not None:
        rec = working
        hooks.append(layers[-1].register_forward_hook(lambda _m, _a, o: rec.start_backward(o)))
        hooks.append(
            layers[0].register_forward_pre_hook(
                lambda _m, a, k: rec.end_backward(a, k), with_kwargs=True
            )
        )
    loss_fn: Any = model.loss_function

    def loss_function(*args: Any, **kwargs: Any) -> Any:
        state["block"] = "loss"
        stack.append("loss")
        try:
            return loss_fn(*args, **kwargs)
        finally:
            stack.pop()

    model.loss_function = loss_function  # type: ignore[assignment]
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    records: dict[Any, fit_.Record] = {}
    # A saved tensor whose graph node is dropped in the forward (a branch the loss does not
    # reach, e.g. DeepSeek's group-limited routing) frees its storage, and a later storage can
    # take its StorageImpl's address: a key whose saved tensors are all gone is a new storage,
    # and only storages some live saved tensor holds at the end of the forward are counted.
    refs: dict[Any, list[weakref.ref[torch.Tensor]]] = {}
    reused: dict[int, int] = {}
    stream = NAMES[next(model.parameters()).dtype]
    em = cuda.Emulation(stream=stream) if device == "cuda" else None

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key: Any = (storage._cdata, reused.get(storage._cdata, 0))
        if key in refs and all(r() is None for r in refs[key]):
            reused[storage._cdata] = key[1] + 1
            key = (storage._cdata, key[1] + 1)
        # The node holds a detached alias, as torch advises (torch/autograd/graph.py::
        # saved_tensors_hooks, 2.13): `t` itself would make a node that saves its own output
        # hold itself (output -> grad_fn -> saved output), a cycle no collector frees, so the
        # outputs saved by nodes the forward drops would stay alive (memplan.verify.measure).
        held = t.detach()
        refs.setdefault(key, []).append(weakref.ref(held))
        if key[0] in skip:
            return held
        block = state["block"]
        if key in records and block not in records[key].savers:  # a later block saves it too
            records[key].modules[block] = record(block, t).module
        if key not in records:
            records[key] = record(block, t)
        records[key].savers.add(block)
        return held

    def record(block: str, t: torch.Tensor) -> fit_.Record:
        """A storage made in `block`, under the innermost module running."""
        module = stack[-1] if stack else ""
        layer_name = f"{paths[int(block.split('.')[1])]}." if block.startswith("layer.") else ""
        rel = module.removeprefix(layer_name) if layer_name else module
        if layer_name and module == layer_name[:-1]:
            rel = ""  # the layer itself (checkpoint's saved inputs)
        dtype = NAMES.get(t.dtype)
        if dtype is None:
            raise MemplanError(f"a saved tensor of dtype {t.dtype} memplan does not know.")
        storage = t.untyped_storage()
        return fit_.Record(block, rel or "(block)", dtype, storage.nbytes() // t.element_size())

    # The cast cache's copies (emulated autocast), each recorded where it was made: those no
    # saved tensor holds at the end of the forward are the cache's alone (autocast_.HELD).
    cached: list[tuple[fit_.Record, torch.Tensor]] = []

    def on_cast(t: torch.Tensor) -> None:
        made = record(state["block"], t)
        cached.append((dataclasses.replace(made, block=autocast_.HELD + made.block), t))

    cast_lists = autocast_lists or ("cuda" if device == "cuda" else None)
    emulated: Any = contextlib.nullcontext()
    cast: Any = contextlib.nullcontext()
    if autocast and cast_lists:
        emulated = autocast_.kernels(cast_lists, DTYPES[autocast])
    elif autocast:
        cast = torch.autocast("cpu", dtype=DTYPES[autocast])
    # the ids' real values, for model code that reads a value made from them (values.py)
    values = values_.Values()
    real_ids = torch.zeros((batch, sequence), dtype=torch.int64)
    recomputed = recompute_.Recomputed(lambda: state["block"], skip, NAMES)
    live: Any = contextlib.nullcontext()
    if working is not None:
        live = working.mode(lambda: working_.layer_window(state["block"]), skip)
        hooks += working.watch(model.parameters())
    cores: Any = (
        selective_.attention_cores(model, recompute_context=recomputed.context)
        if selective
        else contextlib.nullcontext()
    )
    try:
        with (
            mode,
            emulated as region,
            cuda.cuda_kernels(em) if em is not None else cpu_kernels(),
            masks.real_tensor_masks(),
            realrun.real_runs(model, mode),  # weightless modules fake tensors cannot run
            values,
            cores as run,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            region.autocast(on_cast) if region is not None else cast,
            SoftmaxInputs() if softmax_input else contextlib.nullcontext(),
            live,
        ):
            ids = values.seed(torch.zeros((batch, sequence), dtype=torch.int64), real_ids)
            kind = heads.kind_of_name(type(model).__name__) or "lm"
            labels = int(getattr(model.config, "num_labels", 2))
            targets = heads.loss_inputs(kind, ids, labels)
            out = model(input_ids=ids, use_cache=False, **targets)
            alive = {k: r for k, r in records.items() if any(w() is not None for w in refs[k])}
            kept = {k[0] for k in alive}
            held = [r for r, t in cached if t.untyped_storage()._cdata not in kept]
            loss = getattr(out, "loss", None)
            del out  # only the loss kept through the backward, as memplan/verify/rank.py::_step
        if working is not None and loss is None:
            working = None
        if selective or working is not None:
            if loss is None:
                raise MemplanError(
                    f"{type(model).__name__} returned no loss: the selective trace runs its "
                    "backward."
                )
            if selective and not run.calls:
                raise MemplanError(selective_.no_core_message(model))
            if working is not None:
                hooks += working.pending(loss, model.parameters())
            with (
                mode,
                (
                    autocast_.kernels(region.lists, region.dtype)
                    if region is not None
                    else contextlib.nullcontext()
                ),
                cuda.cuda_kernels(em) if em is not None else cpu_kernels(),
                selective_.recomputed_saves(recomputed.save)
                if selective
                else contextlib.nullcontext(),
                live,
            ):
                try:
                    loss.backward()  # the cores' recomputations run the same kernels
                except Exception:
                    if selective:
                        raise
                    # the working sets' own backward: a model whose backward fake tensors
                    # cannot run keeps its profile, with the estimate's working sets
                    working = None
            for p in model.parameters():
                p.grad = None
        del loss
        if working is not None:
            working_.close(working, alive.values())
    finally:
        for hook in hooks:
            hook.remove()
        model.loss_function = loss_fn
    host: set[int] = set()
    if em is not None:
        em.check()
        host = em.host_storages()  # host memory on CUDA (known once the op returned)
    again = zip(recomputed.records, recomputed.storages, strict=True)
    return [
        *(r for key, r in alive.items() if key[0] not in host),
        *(r for r, key in again if key not in host),
        *held,
    ]


class SoftmaxInputs(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """torch before 1.11: softmax and log_softmax keep their input for backward beside their
    output. torch 1.10.0's generated SoftmaxBackward0 and LogSoftmaxBackward0 (torch/include/
    torch/csrc/autograd/generated/Functions.h in its wheels) hold `SavedVariable self_` and
    `result_`; 2.13's hold `self_scalar_type` and `result_` (pytorch/pytorch#64000, fixed by
    #65242, relanded as #66018 on 2021-10-01, first released in 1.11). Every input of
    `aten._softmax` / `aten._log_softmax` that autograd records (grad mode on, the input
    requiring grad) goes to the innermost saved-tensor pack hook, as 1.10's SavedVariable
    would (the trace's own records it; non-reentrant checkpointing's keeps only a handle), and
    what the hook returns is held until the trace ends (a backward frees it with the node)."""

    OPS = (torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default)

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.held: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.OPS and torch.is_grad_enabled() and args[0].requires_grad:
            hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
            self.held.append(hooks[0](args[0]) if hooks else args[0])
        return func(*args, **(kwargs or {}))


def any_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise MemplanError(f"{type(model).__name__} has no list of layers.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
