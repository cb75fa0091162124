"""tnkd: knowledge distillation into tensor networks."""

__version__ = "0.1.0"
