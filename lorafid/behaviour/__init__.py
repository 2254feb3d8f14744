"""The behaviour check: a layer-streamed forward of the fine-tune, its base and served variants."""
