"""lorafid: how much of a fine-tune survives as a LoRA extracted from its delta to the base."""

__version__ = "0.1.0"
