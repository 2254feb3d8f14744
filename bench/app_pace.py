"""The dashboard against the library on many tiny matrices: how much the live charts cost.

    python -m bench.app_pace --matrices 2000                 # both, one after the other
    python -m bench.app_pace --matrices 2000 --fixed-pace    # also the former fixed half-second pace

A pair of ``--matrices`` 4 × 4 float32 matrices in one shard is served by the loopback Hub
(``tests/hub_server.py``); the library audits it with ``lorafid.audit.engine.Audit``, then the
dashboard does the same through ``gradio_client`` (its own store, so nothing is reused).
Per-matrix work is tiny, so what remains is overhead: one range read and one store row per
matrix in both, plus the chart redraws in the dashboard. Prints seconds and the ratio to
the library, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gradio_client import Client
from safetensors.torch import save

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.store import Store
from lorafid.web.config import AppConfig
from lorafid.web.pacing import Throttle
from tests.hub_server import HubServer
from tests.web.test_app import serve


def tiny_pair(hub: HubServer, matrices: int) -> None:
    generator = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(4, 4, generator=generator) for i in range(matrices)}
    tuned = {name: w + 0.01 * torch.randn(4, 4, generator=generator) for name, w in base.items()}
    hub.add_repo("org/base", {"model.safetensors": save(base)})
    hub.add_repo("org/tuned", {"model.safetensors": save(tuned)})


def library_s(hub: HubServer, home: Path) -> float:
    started = time.perf_counter()
    config = AuditConfig(device="cpu", endpoint=hub.endpoint, store=Store(home))
    with Audit("org/base", "org/tuned", config) as job:
        for _ in job.run():
            pass
    return time.perf_counter() - started


def dashboard_s(hub: HubServer, home: Path, timeout_s: float) -> float:
    config = AppConfig(endpoint=hub.endpoint, store_home=home, examples_dir=home / "none", device="cpu")
    with serve(config) as url:
        client = Client(url, verbose=False)
        started = time.perf_counter()
        job = client.submit("org/base", "org/tuned", "", "", 8, "energy_retained", "", api_name="/run_audit")
        job.result(timeout=timeout_s)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=2000)
    parser.add_argument("--fixed-pace", action="store_true", help="also time the former fixed 0.5 s redraw pace")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    with HubServer() as hub, tempfile.TemporaryDirectory(prefix="lorafid-pace-") as folder:
        tiny_pair(hub, args.matrices)
        library = library_s(hub, Path(folder) / "library")
        print(f"library:   {args.matrices} matrices in {library:.1f} s")
        paced = dashboard_s(hub, Path(folder) / "app", args.timeout_s)
        print(f"dashboard: {paced:.1f} s ({paced / library:.1f}x the library), redraws paced by their cost")
        if args.fixed_pace:
            Throttle.spent = lambda self, seconds: None  # type: ignore[method-assign]  # every 0.5 s, whatever it costs
            try:
                fixed = dashboard_s(hub, Path(folder) / "fixed", args.timeout_s)
                print(f"dashboard: {fixed:.1f} s ({fixed / library:.1f}x the library) at a fixed 0.5 s pace")
            except TimeoutError:
                print(f"dashboard at a fixed 0.5 s pace: not done after {args.timeout_s:.0f} s")


if __name__ == "__main__":
    main()
