"""``lorafid probe BASE FINETUNE --endpoint URL --model NAME``: the provider check."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from lorafid.cli.arguments import add_verbose, check_writable, positive_float, positive_int, quantizations, rank_list
from lorafid.cli.behave import add_direction_cache, add_threads, direction_cache, say_cached, use_threads
from lorafid.errors import LorafidError
from lorafid.providers.probe import ALL_CHANNELS, DEFAULT_QUANTIZED
from lorafid.providers.quantize import SCHEMES
from lorafid.providers.text_channel import MAX_SAMPLES, MAX_TOKENS_CAP, TEXT
from lorafid.retry import RetryPolicy


def add_probe(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    probe = commands.add_parser(
        "probe", help="does an OpenAI-compatible API serve the fine-tune, a rank-r extraction of it, or another model?"
    )
    probe.add_argument("base", help="the base model: Hub repo ID (org/name[@revision]) or a local directory")
    probe.add_argument("finetune", help="the fine-tune the API claims to serve, same forms as BASE")
    probe.add_argument("--endpoint", required=True, help="the API's base URL, e.g. https://api.example.com/v1")
    probe.add_argument("--model", required=True, help="the model name the API serves the fine-tune under")
    probe.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY); never logged or stored",
    )
    probe.add_argument(
        "--ranks",
        type=rank_list,
        default=(16, 32, 64, 128, 256, 512),
        help="candidate ranks (default: 16,32,64,128,256,512)",
    )
    probe.add_argument("--prompts", type=Path, help="one text per line, or JSONL with a text field (default: built-in)")
    probe.add_argument("--out", type=Path, help="write the lorafid.probe/1 JSON report here")
    probe.add_argument(
        "--top-logprobs", type=positive_int, default=20, help="alternatives asked per token (default 20)"
    )
    probe.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="chat only: greedy tokens per prompt (default 32)"
    )
    probe.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight (default 4)")
    probe.add_argument("--rate", type=positive_float, help="at most this many requests per second (default: no limit)")
    probe.add_argument("--max-retries", type=int, default=8, help="retries on 429/5xx over the whole probe (default 8)")
    probe.add_argument(
        "--channel",
        choices=("auto", *ALL_CHANNELS),
        default="auto",
        help="how to read the provider: auto (default) tries the log-probability channels, then sampled text "
        f"({TEXT}); name one to use it alone",
    )
    probe.add_argument(
        "--max-requests",
        type=positive_int,
        help="a hard budget of requests for the whole probe, retries included (e.g. 5 on a rate-limited free plan)",
    )
    probe.add_argument(
        "--max-tokens",
        type=positive_int,
        default=MAX_TOKENS_CAP,
        help=f"text channel: sampled tokens per continuation (default and cap {MAX_TOKENS_CAP}; the model's "
        "context bounds it too)",
    )
    probe.add_argument(
        "--samples",
        type=positive_int,
        default=MAX_SAMPLES,
        help=f"text channel: n per prompt where the API takes n (default {MAX_SAMPLES})",
    )
    probe.add_argument(
        "--candidates",
        type=quantizations,
        default=DEFAULT_QUANTIZED,
        help=f"quantized copies of the fine-tune to compare besides the 8-bit reference, comma-separated, from "
        f"{', '.join(SCHEMES)}; base:SCHEME adds every rank's extraction served on a quantized base (e.g. "
        f"base:fp8); 'none' for none (default: {','.join(DEFAULT_QUANTIZED)}). Each costs one local forward pass",
    )
    probe.add_argument(
        "--full-grid",
        action="store_true",
        help="score every candidate (one local forward each); by default, on log-probabilities, a coarse grid is "
        "scored first, then only the neighbours of the candidates the evidence cannot rule out (the text channel "
        "always scores every candidate)",
    )
    probe.add_argument("--seed", type=int, default=0, help="text channel: the seed sent with each request (default 0)")
    probe.add_argument("--device", default="auto", help="where the local candidates run: auto, cpu, cuda or cuda:N")
    add_threads(probe)
    add_direction_cache(probe)
    probe.add_argument("--token", help="Hub token for the two repos (default: HF_TOKEN or the stored login)")
    probe.add_argument("--quiet", action="store_true", help="no progress bars and no table (the verdict still prints)")
    add_verbose(probe)


def run_probe(args: argparse.Namespace) -> int:
    """Exit 0 with a complete probe; 1 when some prompts failed, 130 when interrupted (the report
    and the verdict keep the prompts it got)."""
    from lorafid.providers.probe import Probe, ProbeConfig, probe_prompts

    check_writable(args.out)
    use_threads(args.threads)
    texts, prompt_set = probe_prompts(args.prompts)
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        print(f"lorafid: ${args.api_key_env} is not set: sending no API key.", file=sys.stderr)
    config = ProbeConfig(
        endpoint=args.endpoint,
        model=args.model,
        api_key=api_key,
        ranks=tuple(args.ranks),
        top_k=args.top_logprobs,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        rate_per_s=args.rate,
        max_retries=max(0, args.max_retries),
        retry=RetryPolicy.retries(min(4, max(0, args.max_retries))),
        channel=None if args.channel == "auto" else args.channel,
        max_requests=args.max_requests,
        max_tokens=min(args.max_tokens, MAX_TOKENS_CAP),
        samples=args.samples,
        quantized=tuple(args.candidates),
        full_grid=args.full_grid,
        seed=args.seed,
        hub_token=args.token,
        device=args.device,
        direction_cache=direction_cache(args),
    )
    job = Probe(args.base, args.finetune, texts, prompt_set, config)
    plan = job.plan()  # reads both models' headers: the candidates below are those of this model's grid
    candidates = job.candidates()
    how = (
        ""
        if config.full_grid
        else " (on log-probabilities a coarse grid first, then only the neighbours of what the evidence holds)"
    )
    print(
        f"lorafid: {len(candidates)} local candidates, one forward pass each{how}: {', '.join(candidates)}",
        file=sys.stderr,
    )
    print(f"lorafid: {plan.describe()}", file=sys.stderr)  # before the first request
    bars: dict[str, tqdm] = {}

    try:
        for step in job.run():
            if step.stage not in bars:
                label = "provider" if step.stage == "provider" else "local candidates"
                bars[step.stage] = tqdm(total=step.total, desc=label, unit="prompt", disable=args.quiet)
            if step.done < bars[step.stage].n:  # the next pass of the refined grid starts over
                bars[step.stage].reset(total=step.total)
            bars[step.stage].update(step.done - bars[step.stage].n)
        report = job.report()
    finally:
        for bar in bars.values():
            bar.close()
    if args.out is not None:
        try:
            args.out.write_text(report.to_json() + "\n")
        except OSError as e:
            raise LorafidError(f"Cannot write {args.out}: {e.strerror}.") from e
    if report.verdict is not None:
        print(report.verdict.sentence)
    say_cached(report.settings, args.quiet)
    if not args.quiet:
        print(f"\nread by {report.method}; {report.requests['sent']} requests sent\n{report.table()}")
    if report.status != "complete":
        interrupted = (report.error or "").startswith("interrupted")
        failed = len(texts) - len(report.prompts)
        print(
            f"lorafid: {'interrupted' if interrupted else 'error'}: the probe is partial ({failed} of {len(texts)} "
            f"prompts missing: {report.error or next(iter(report.failed_prompts.values()), '')}); the report keeps "
            "the rest. Run the same command again for a complete probe.",
            file=sys.stderr,
        )
        return 130 if interrupted else 1
    return 0
