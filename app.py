"""The Hugging Face Space's entry point: ``python app.py`` serves the lorafid dashboard.

The dashboard is ``lorafid.web.app`` (one module per tab under ``lorafid/web/tabs``); this
file reads the command line, builds the app for this deployment and launches it. A bad
server setting stops it with one line that says which, not a traceback.
"""

import argparse

from lorafid.errors import LorafidError
from lorafid.web.app import build_app, launch_options
from lorafid.web.config import AppConfig

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the lorafid dashboard.")
    parser.add_argument("--allow-local", action="store_true", help="also audit local paths (private servers only)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or GRADIO_SERVER_PORT)")
    args = parser.parse_args()
    try:
        demo = build_app(AppConfig.from_env(allow_local=args.allow_local))
    except LorafidError as e:  # a bad server setting: one line that says which, not a traceback
        raise SystemExit(f"lorafid: {e}") from None
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
