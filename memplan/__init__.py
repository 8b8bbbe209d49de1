"""memplan: how much memory a training job needs, per GPU and per host, and which layout fits."""

__version__ = "0.1.0"
