"""`memplan inventory --json`: the model's tensors."""

from __future__ import annotations

from pydantic import Field

from memplan.report.schema.base import Doc


class InventoryTensor(Doc):
    """One parameter tensor, as `named_parameters()` lists it."""

    name: str = Field(description="Fully qualified name.")
    shape: list[int] = Field(description="Shape in elements.")
    dtype: str = Field(description="Its dtype: its own, or the precision recipe's parameter dtype.")
    numel: int = Field(description="Elements.")


class InventoryBuffer(InventoryTensor):
    """One buffer, as `named_buffers()` lists it."""

    persistent: bool = Field(description="Saved in the state dict (False: persistent=False).")


class LargestTensor(Doc):
    """The parameter tensor with the most elements."""

    name: str = Field(description="Its name.")
    shape: list[int] = Field(description="Its shape.")
    numel: int = Field(description="Its elements.")


class LargestLayer(Doc):
    """The repeated block (decoder layer) with the most parameters."""

    layer: int = Field(description="Its index.")
    num_parameters: int = Field(description="Its parameters.")


class InventoryReport(Doc):
    """`memplan inventory --json`: every tensor of the model, and its counts."""

    name: str = Field(description="Display name of the model.")
    num_parameters: int = Field(description="Elements over distinct parameter tensors.")
    num_parameter_tensors: int = Field(description="Distinct parameter tensors.")
    num_non_embedding_parameters: int | None = Field(
        description="Parameters outside the embeddings, positions and LM head; null: cannot say."
    )
    num_active_parameters: int | None = Field(
        description="Parameters one token runs through (active_parameters_definition)."
    )
    num_active_non_embedding_parameters: int | None = Field(
        description="The active parameters outside the embeddings, positions and LM head."
    )
    active_parameters_definition: str = Field(description="What counts as active.")
    largest_tensor: LargestTensor | None = Field(description="The largest parameter tensor.")
    largest_layer: LargestLayer | None = Field(description="The largest repeated block.")
    tied: list[list[str]] = Field(description="(alias, owner) pairs of tied parameters.")
    parameters: list[InventoryTensor] = Field(description="Every distinct parameter tensor.")
    buffers: list[InventoryBuffer] = Field(description="Every buffer.")
    notes: list[str] = Field(description="What the inventory ignored or assumed.")
