"""The stand-in backbone: the analogue of T5-LM, trained with the real pretrain engine.

A tiny T5 (tensorpoly_ds.models architecture) learns to reconstruct generic word sequences of the
benchmark's vocabulary in which a share of the words is replaced by a mask token: the whole sequence is
the target, so the model learns to copy, to keep track of positions and which words belong together
(categories co-occur in the corpus), but never sees a task. It is trained as a full fine-tune by
`tensorpoly_ds.engine.trainer.Trainer` (DeepSpeed, ZeRO-0, fp32; its run config is
replicate.config.BACKBONE_RUN_CONFIG resolved) and exported with `save_pretrained`, so
every later stage loads it by path like a Hugging Face checkpoint.

Cached: CACHE/backbone-<key>/ where key hashes the backbone section and the tokenizer, so the same
config reuses the same weights; the run resumes from its last checkpoint if interrupted. Reproducible
from backbone.seed (model init, corpus, masks and data order all derive from it).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from tpds_common.errors import JobFailed
from tpds_common.files import atomic_write_json
from tpds_common.log import get_logger

from .config import BackboneSection

log = get_logger("replicate")

TASK_NAME = "generic_denoising"
DONE_FILE = "backbone.json"


def backbone_key(section: BackboneSection, tokenizer_sha: str, vocab_size: int) -> str:
    import hashlib

    body = json.dumps([asdict(section), tokenizer_sha, vocab_size], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def denoising_rows(tokenizer, section: BackboneSection, n: int, seed: int) -> dict[str, list]:
    """Columns task_id / input_ids / target_ids: each sequence with mask_ratio of its words replaced by the
    unknown-word token (it never occurs in the benchmark) as input, the whole sequence + EOS as target."""
    from data_prep import latent_skills

    special = set(tokenizer.all_special_tokens)
    vocab = tuple(sorted(w for w in tokenizer.get_vocab() if w not in special))
    corpus = latent_skills.generic_corpus(n, seed, other_words=vocab)
    rng = random.Random(f"backbone|masks|{seed}")
    mask, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
    inputs, targets = [], []
    for words in corpus:
        ids = tokenizer.convert_tokens_to_ids(words)
        x = list(ids)
        for i in rng.sample(range(len(x)), max(1, round(section.mask_ratio * len(x)))):
            x[i] = mask
        inputs.append(x)
        targets.append(list(ids) + [eos])
    return {"task_id": [0] * n, "input_ids": inputs, "target_ids": targets}


def loss_curve(run_dir: Path) -> dict:
    """{"train": [[step, loss], ...], "val": [[step, loss], ...]} from the engine's metrics.jsonl."""
    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and "train/loss" in row:
            train.append([row["step"], row["train/loss"]])
        elif row.get("kind") == "eval" and "val/loss" in row:
            val.append([row["step"], row["val/loss"]])
    # a resumed run appends: keep the last value logged for each step
    return {"train": sorted(dict(train).items()), "val": sorted(dict(val).items())}


def plot_curves(curves: dict[str, dict], path: Path, title: str) -> Path:
    """Training (smoothed) and validation loss of one or more runs in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..figures import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, c) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        if c["train"]:
            steps, losses = zip(*c["train"])
            w = max(1, len(losses) // 50)
            smooth = [
                sum(losses[max(0, j - w + 1) : j + 1]) / len(losses[max(0, j - w + 1) : j + 1])
                for j in range(len(losses))
            ]
            ax.plot(steps, smooth, color=colour, alpha=0.5, lw=1, label=f"{name} train")
        if c["val"]:
            steps, losses = zip(*c["val"])
            ax.plot(steps, losses, "o-", color=colour, ms=3, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.set_yscale("log")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def backbone_run_config(section: BackboneSection, vocab_size: int, run_dir: Path):
    """The backbone's run config (a tensorpoly_ds.engine.config.RunConfig): BACKBONE_RUN_CONFIG resolved against
    `section`, validated by the engine's run-config loader like any pretraining run's."""
    from ..engine.config import build_run_config
    from .config import BACKBONE_RUN_CONFIG, resolve_run_config

    sources: dict = {}
    values = {"backbone": asdict(section), "run": {"vocab_size": vocab_size, "dir": str(run_dir)}}
    data = resolve_run_config(BACKBONE_RUN_CONFIG, values, "replicate BACKBONE_RUN_CONFIG", sources)
    return build_run_config(data, sources)


def train_backbone(
    section: BackboneSection, data_dir: Path, cache: Path, *, threads: int = 1, train_now: bool = True
) -> Path:
    """Train (or find in the cache) the T5-LM analogue for the tokenizer of `data_dir`; returns the
    directory of the exported checkpoint (config.json + model.safetensors)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from data_prep.manifest import load_tokenizer, read_manifest

    from ..engine.checkpoint import seed_all
    from ..engine.trainer import DataOptions, Trainer
    from ..models import t5_config

    tok_info = read_manifest(data_dir).tokenizer
    key = backbone_key(section, tok_info.get("sha256", ""), int(tok_info["vocab_size"]))
    root = cache / f"backbone-{key}"
    export = root / "export"
    if (root / DONE_FILE).is_file() and (export / "config.json").is_file():
        log.info(f"backbone {root}: cached")
        return export
    if not train_now:
        raise JobFailed(f"no trained backbone at {root}: run the 'backbone' stage first")
    tokenizer = load_tokenizer(data_dir)
    rows, val = denoising_datasets(tokenizer, section)
    run = backbone_run_config(section, int(tok_info["vocab_size"]), root)
    torch.set_num_threads(threads)
    seed_all(run.train.seed)
    model = T5ForConditionalGeneration(
        t5_config(run.model.name_or_path, vocab_size=run.model.vocab_size, **run.model.arch_overrides)
    )
    log.info(
        f"backbone {root}: training {section.arch} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters) for {section.steps} steps on {section.corpus_size} generic sequences"
    )
    result = Trainer(
        model,
        rows,
        optim=run.optim,
        train=run.train,
        deepspeed=run.deepspeed,
        run_dir=run.run.dir,
        tasks=[TASK_NAME],
        val_rows=val,
        data=DataOptions.of(run.data, tokenizer.eos_token_id),
        export_dir=export,
        export_extra={"backbone_section": asdict(section), "tokenizer_sha256": tok_info.get("sha256")},
    ).run("auto")
    if result.status != "done":
        raise KeyboardInterrupt(f"backbone training stopped at step {result.step} (rerun to resume)")
    _record_done(section, root, key, export)
    return export


def denoising_datasets(tokenizer, section: BackboneSection):
    """The training and validation splits (datasets.Dataset) of the denoising corpus."""
    import datasets

    features = datasets.Features(
        {
            "task_id": datasets.Value("int32"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "target_ids": datasets.List(datasets.Value("int32")),
        }
    )
    rows = datasets.Dataset.from_dict(
        denoising_rows(tokenizer, section, section.corpus_size, section.seed), features=features
    )
    val = datasets.Dataset.from_dict(
        denoising_rows(tokenizer, section, section.val_size, section.seed + 1), features=features
    )
    return rows, val


def _record_done(section: BackboneSection, root: Path, key: str, export: Path) -> None:
    """The loss curve (JSON and PNG), then DONE_FILE, which makes the export a cache hit; checkpoints go."""
    curve = loss_curve(root)
    (root / "loss_curve.json").write_text(json.dumps(curve))
    plot_curves(
        {"T5-LM analogue": curve},
        root / "loss_curve.png",
        f"backbone: {section.arch}, {section.steps} steps, batch {section.micro_batch}",
    )
    atomic_write_json(
        root / DONE_FILE,
        {
            "key": key,
            "section": asdict(section),
            "export": str(export),
            "final_val_loss": curve["val"][-1][1] if curve["val"] else None,
        },
    )
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # the export is what later stages need
