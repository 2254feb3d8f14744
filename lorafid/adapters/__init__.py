"""PEFT adapters: writing a rank-r extraction, auditing a published adapter."""
