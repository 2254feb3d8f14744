"""The Gradio dashboard: ``app`` composes it, ``tabs`` holds one module per tab.

The rest are Gradio-free parts with one job each: ``config`` (deployment settings),
``gallery`` (audits to open, who may open them), ``links`` (permalinks), ``text`` (words,
escaping), ``pacing``, ``limits``, ``downloads`` and ``plots`` (figures).
"""
