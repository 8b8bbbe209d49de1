"""Report: `estimate` runs the stages for a spec; `result` holds what it found per rank and the
verdict; `json` writes it as the `--json` document whose JSON Schema `schema` defines."""
