"""Beside the report: `search` tries the layouts a GPU count allows and keeps those that fit,
ranked by a step-time model (`steptime`); `json` writes the `--json` document."""
