"""`accelerate estimate-memory` (accelerate/commands/estimate.py), run on a local config.

The command fetches the config from the Hugging Face Hub (it fails offline, field notes), so
we run its own `gather_data` with its Hub step, `create_empty_model`, replaced by the same
construction from a local config.json: `AutoModel.from_config(config, torch_dtype=float32)`
under `init_empty_weights()`. The rest is accelerate's code: `calculate_maximum_sizes(model)`
and `estimate_training_usage(total_size, dtype)`, whose "Training using Adam" column is the
max of its terms (model, gradients, optimizer, step): 16 B/param for float32 (the step term,
4 x fp32 size) and 8 B/param for 16-bit (fp32 model + fp32 and 16-bit gradients ... the
optimizer term, 2 x fp32 size).

What it models: one device, Adam, the weights of the base model (AutoModel: an untied
output head is not counted), no activations, no sharding. "float32" and "float16" rows; its
16-bit row is mixed precision (fp32 weights kept), so pure bf16 has no row.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import warnings
from typing import Any
from unittest import mock

from . import ADAM, MIXED, NotExpressible, Prediction, Result, Setting, _hf

NAME = "accelerate"


def available() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def empty_model(config: dict[str, Any]) -> Any:
    """accelerate's `create_empty_model` for a transformers model, minus the Hub lookup."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers.utils import logging

    logging.set_verbosity_error()  # transformers 5 says torch_dtype is deprecated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights():
            return transformers.AutoModel.from_config(
                _hf.hf_config(config), torch_dtype=torch.float32
            )


def gather(config: dict[str, Any], dtypes: list[str]) -> list[list[Any]]:
    """accelerate's `gather_data` rows: [dtype, largest layer, total size, training sizes]."""
    from accelerate.commands import estimate

    args = argparse.Namespace(
        model_name="local", library_name="transformers", dtypes=dtypes, trust_remote_code=False
    )
    with mock.patch.object(estimate, "create_empty_model", lambda *_a, **_k: empty_model(config)):
        return list(estimate.gather_data(args))


def print_table(config: dict[str, Any], dtypes: list[str]) -> str:
    """The table `accelerate estimate-memory` prints, for a local config."""
    from accelerate.commands import estimate

    args = argparse.Namespace(
        model_name="local", library_name="transformers", dtypes=dtypes, trust_remote_code=False
    )
    out = io.StringIO()
    with (
        mock.patch.object(estimate, "create_empty_model", lambda *_a, **_k: empty_model(config)),
        contextlib.redirect_stdout(out),
    ):
        estimate.estimate_command(args)
    return out.getvalue()


def predict(s: Setting) -> Result:
    if s.optimizer not in ADAM:
        return NotExpressible("Adam only")
    if s.precision == "fp32":
        dtype = "float32"
    elif s.precision in MIXED:
        dtype = "float16"
    else:
        return NotExpressible("no pure 16-bit row")
    if s.ranks > 1 and not (s.engine == "ddp" and s.stage == 0):
        return NotExpressible("no sharding")
    [row] = gather(s.config, [dtype])
    _dtype, largest, total_size, training = row
    figure = max(training.values())
    return Prediction(
        model_states=None,
        total=int(figure),
        how=f"estimate-memory --dtypes {dtype}: max of {training}",
        extra={"total_size": int(total_size), "largest_layer": int(largest), "terms": training},
    )
