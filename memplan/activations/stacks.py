"""One micro-batch's activations of the stacks' own model code where a layout or fine-tuning
method needs more than their single-device rule: LitGPT's LoRA (memplan.model.stacks.
litgpt_lora), adapter and adapter_v2 (memplan.model.stacks.litgpt_adapter_saved) and Megatron-Core's
GPTModel under tensor, sequence and context parallelism (memplan.model.stacks.megatron).
memplan.activations.micro_batch dispatches here."""

from __future__ import annotations

from dataclasses import replace

from memplan.activations import predict
from memplan.config.finetune import FinetuneSpec
from memplan.model.forward.tensors import Activations, Setting
from memplan.model.inventory import Architecture, Inventory
from memplan.states.layout import Layout


def litgpt_lora(arch: Architecture, st: Setting, ft: FinetuneSpec) -> Activations:
    """LitGPT's LoRA and QLoRA (memplan.model.stacks.litgpt_lora): litgpt 0.5.9's
    finetune/lora.py, whose options are lora.py::Config's flags and --quantize bnb.*; what
    they cannot say is refused. Its adapter and adapter_v2: memplan.model.stacks.
    litgpt_adapter_saved.activations."""
    from memplan.config.finetune import LITGPT_ADAPTERS, bnb_keeps_input
    from memplan.model.stacks import litgpt, litgpt_lora, litgpt_lora_adapters, litgpt_qlora

    why = ""
    lightning = ("skip_modules", "prepare_kbit")
    if ft.method in LITGPT_ADAPTERS:
        # litgpt 0.5.9's adapter / adapter_v2 GPT (memplan.model.stacks.litgpt_adapter_saved).
        from memplan.model.stacks import litgpt_adapter_saved

        return litgpt_adapter_saved.activations(arch, st, ft)
    if ft.method == "qlora" and any(k in ft.model_fields_set for k in lightning):
        why = (
            "finetune.skip_modules and prepare_kbit are transformers' and peft's: LitGPT's "
            "QLoRA (finetune/lora.py --quantize bnb.*) quantizes every Linear, the head "
            "included (Lightning's BitsandbytesPrecision, no ignore_modules), and never calls "
            "prepare_model_for_kbit_training"
        )
    elif ft.method == "qlora" and st.checkpointing != "none":
        why = (
            "LitGPT recomputes only under its FSDPStrategy (finetune/lora.py::setup, more than "
            "one device), which --quantize refuses: qlora runs with activation_checkpointing "
            "none"
        )
    elif ft.freeze or ft.modules_to_save or ft.exclude_modules or ft.bias != "none":
        why = (
            "LitGPT's LoRA trains the adapters only (lora.py::mark_only_lora_as_trainable, "
            "bias 'none' as finetune/lora.py calls it): finetune.freeze, modules_to_save, "
            "exclude_modules and bias are not LitGPT options"
        )
    flags = litgpt_lora_adapters.flags_of(ft.target_modules, rank=ft.rank, dropout=ft.dropout)
    if not why and isinstance(flags, str):
        why = flags
    if why or isinstance(flags, str):
        return litgpt.refused(f"activations not modelled: {why}.")
    quant = None
    if ft.method == "qlora":
        quant = litgpt_qlora.Quant(
            keeps_input=bnb_keeps_input(ft), stable_embedding=litgpt_qlora.swaps_embedding(ft)
        )
    return litgpt_lora.saved(arch, st, flags, quant)


def megatron_core(inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec) -> Activations:
    """Megatron-Core's GPTModel on one GPU (memplan.model.stacks.megatron) for full training:
    one TP and CP rank's slice (with or without sequence parallelism), and with MoE layers
    (memplan.model.stacks.megatron_moe) one EP rank's experts; pipeline stages split its
    layers as any other."""
    from memplan.activations import layout
    from memplan.model.stacks import megatron, megatron_moe

    why = ""
    arch = inventory.architecture
    moe = arch is not None and megatron_moe.is_moe(arch)
    if ft.method != "full" or ft.freeze:
        why = (
            "activations of Megatron-Core's model code are not modelled for LoRA, QLoRA or "
            "frozen parameters"
        )
    elif lay.expert > 1 and not moe:
        why = (
            "activations of Megatron-Core's model code are modelled at expert = 1 for a dense "
            "model (expert parallelism splits MoE layers' experts)"
        )
    elif moe and lay.expert_capacity_factor is not None and st.moe_dispatcher != "alltoall":
        why = (
            "Megatron-Core's MoE layer with expert_capacity_factor (drop and pad) is modelled "
            "for the alltoall dispatcher, where it was measured (set parallelism."
            "moe_dispatcher: alltoall); with allgather it is modelled dropless only "
            f"({megatron_moe.SRC_ROUTER})"
        )
    elif moe and arch is not None and lay.expert_capacity_factor is not None:
        why = megatron_moe.capacity_refusal(arch, st.tokens, lay.expert_capacity_factor)
    elif moe and lay.tensor > 1 and st.megatron_spec == "local":
        why = (
            "Megatron-Core's MoE layer under the local spec runs no tensor parallelism "
            f"({megatron_moe.SRC_TP})"
        )
    elif lay.context > 1 and st.megatron_spec == "local":
        why = (
            "Megatron-Core's local spec runs no context parallelism (its attention refuses it: "
            f"{megatron.SRC_NO_CP_LOCAL}): set model.megatron_spec: te"
        )
    elif lay.tensor > 1 and lay.sequence_parallel and st.megatron_spec == "local":
        why = (
            "Megatron-Core's local spec runs no sequence parallelism (its torch norms refuse "
            f"it: {megatron.SRC_NO_SP_LOCAL}): set sequence_parallel: false or "
            "model.megatron_spec: te"
        )
    if not why and lay.tensor > 1 and arch is not None:
        why = layout.check(arch, st, lay)
    if why:
        return replace(
            layout.refused(why), implementation="megatron-core", megatron_spec=st.megatron_spec
        )
    if moe and arch is not None and (lay.expert > 1 or lay.expert_capacity_factor is not None):
        # One EP rank's experts (memplan.model.stacks.megatron_moe: balanced and dropless, or
        # padded to capacity).
        factor = lay.expert_capacity_factor
        st = replace(
            st,
            expert_pairs=layout.expert_pairs(arch, st.tokens, lay),
            local_experts=arch.num_experts // lay.expert,
            expert_capacity=(
                None if factor is None else megatron_moe.capacity(arch, st.tokens, factor)
            ),
        )
    if (lay.tensor == 1 and lay.context == 1) or arch is None:
        return predict(inventory, st)
    # Megatron's TP (memplan.model.stacks.megatron: the rule at one TP rank's heads,
    # intermediate size and vocabulary rows), sequence parallelism splitting what TP leaves
    # whole (its linears save their sequence shard and gather it again in backward), CP
    # running sequence / CP tokens through TE's ring attention.
    local_st = layout.local_setting(st, lay)
    local_arch = layout.local_architecture(arch, lay)
    local = predict(replace(inventory, architecture=local_arch), local_st)
    if not local.modelled:
        return local
    extra = {}
    if lay.tensor > 1:
        extra["embeddings"] = (megatron.tensor_parallel_embedding(local_st),)
    blocks = tuple(
        replace(b, tensors=(*b.tensors, *extra[b.name])) if b.name in extra else b
        for b in local.blocks
    )
    if lay.context > 1:
        blocks = tuple(
            megatron.te_context_parallel(b, local_st, local_arch, lay.context)
            if b.name == "layers"
            else b
            for b in blocks
        )
    local = replace(local, blocks=blocks)
    if lay.sequence_parallel:
        local = layout.split(predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=(*local.buffers, *layout.buffers(arch, local_st, lay)))
