"""The edge users touch: the typer commands (`app`) and their rich tables (`render`). It parses,
calls the calculator and renders; it computes nothing itself."""
