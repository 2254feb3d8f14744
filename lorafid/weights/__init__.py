"""Where weight bytes come from: checked HTTP range reads, Hub and local sources, safetensors headers."""
