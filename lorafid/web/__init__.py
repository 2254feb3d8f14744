"""The Gradio dashboard's parts: figures, gallery, links, limits."""
