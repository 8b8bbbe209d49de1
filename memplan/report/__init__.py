"""Report: `estimate` runs the stages for a spec and holds the result per rank;
`json` writes it as the `--json` document whose JSON Schema `schema` defines."""
