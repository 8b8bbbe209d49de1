"""The edge users touch: the typer commands (`app`) and their rich tables (`render`), entered
through `entry.main`. It parses, calls the calculator and renders; it computes nothing itself."""
