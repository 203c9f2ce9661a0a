"""summary.md: the results page of one replicate run (tables, verdicts, recovery, learning rates, time)."""

from __future__ import annotations

from .config import ReplicateConfig


def _recovery_table(recovery: dict) -> str:
    if not recovery:
        return "No routed method with learned routing in this variant.\n"
    lines = ["| Method | Score (Spearman) | Null mean | p | Skill matching | Figure |", "|---|---|---|---|---|---|"]
    for label, r in recovery.items():
        if "error" in r:
            lines.append(f"| {label} | — | — | — | — | failed: {r['error']} |")
            continue
        lines.append(
            f"| {label} | {r['score']:+.3f} | {r['null_mean']:+.3f} | {r['p_value']:.3g} | "
            f"{r['matching']:+.3f} | [{r['plot']}]({r['plot']}) |"
        )
    return "\n".join(lines) + "\n"


def _selection_table(selection: list[dict]) -> str:
    lrs = sorted({lr for s in selection for lr in s["lrs"]}, key=float)
    lines = [
        "| Row | k | chosen lr | " + " | ".join(f"dev @ {lr} | test @ {lr}" for lr in lrs) + " |",
        "|---|---|---|" + "---|---|" * len(lrs),
    ]
    for s in selection:
        cells = []
        for lr in lrs:
            st = s["lrs"].get(lr)
            cells += [f"{100 * st['dev']:.1f}", f"{100 * st['test']:.1f}"] if st else ["", ""]
        lines.append(f"| {s['row']} | {s['k']} | {s['chosen_lr']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pretraining_table(pretraining: dict) -> str:
    """Each method's recipe, the learning rates its search chose and its val loss per world."""
    methods = pretraining["methods"]
    worlds = sorted({w for e in methods.values() for w in e["val_loss"]})
    lines = [
        "| Method | optimizer | module lr | routing lr | edge | "
        + " | ".join(f"val loss {w or 'world'}" for w in worlds)
        + " | mean | trained |",
        "|---|---|---|---|---|" + "---|" * len(worlds) + "---|---|",
    ]
    for label, e in methods.items():
        lrs = {
            "module_lr": e["recipe"]["module_lr"],
            "routing_lr": e["recipe"]["routing_lr"],
            **(e.get("search") or {}).get("chosen", {}),
        }
        edges = ", ".join(
            f"{a['key']} at {a['edge']} edge" for a in (e.get("search") or {}).get("axes", []) if a["edge"]
        )
        extended = ", ".join(
            f"{a['key']} +{a['extended']}" for a in (e.get("search") or {}).get("axes", []) if a["extended"]
        )
        losses = [f"{e['val_loss'][w]:.3f}" if e["val_loss"].get(w) is not None else "—" for w in worlds]
        mean = f"{e['mean_val_loss']:.3f}" if e["mean_val_loss"] is not None else "—"
        searched = "searched" if e.get("search") else "fixed"
        lines.append(
            f"| {label} | {e['recipe']['optimizer']} | {lrs['module_lr']:g} | {lrs['routing_lr']:g} | "
            f"{searched}{'; ' + extended if extended else ''}{'; ' + edges if edges else ''} | "
            + " | ".join(losses)
            + f" | {mean} | "
            + ("**did not train**" if label in pretraining["did_not_train"] else "yes")
            + " |"
        )
    return "\n".join(lines) + "\n"


def _sensitivity_table(sensitivity: dict) -> str:
    lines = [
        "| Method | lr (module axis) | val loss | dev accuracy (%) | val-loss rule | dev rule |",
        "|---|---|---|---|---|---|",
    ]
    for label, e in sensitivity.items():
        for value, c in sorted(e["candidates"].items(), key=lambda kv: float(kv[0])):
            loss = "—" if c["val_loss"] is None else f"{c['val_loss']:.3f}"
            dev = "—" if c["dev"] is None else f"{100 * c['dev']:.1f}"
            lines.append(
                f"| {label} | {value} | {loss} | {dev} | {'**chosen**' if value == e['chosen_by_val_loss'] else ''} | "
                f"{'**chosen**' if value == e['chosen_by_dev'] else ''} |"
            )
    agree = sum(e["agree"] for e in sensitivity.values())
    return "\n".join(lines) + f"\n\nThe two rules agree for {agree} of {len(sensitivity)} methods.\n"


def _spread_table(spread: dict) -> str:
    worlds = sorted({w for e in spread.values() for w in e["worlds"]})
    lines = ["| Row | " + " | ".join(worlds) + " | range (pp) |", "|---|" + "---|" * len(worlds) + "---|"]
    for row, e in spread.items():
        lines.append(
            f"| {row} | "
            + " | ".join(f"{100 * e['worlds'][w]:.1f}" if w in e["worlds"] else "—" for w in worlds)
            + f" | {100 * e['range']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _problems(problems: list[dict]) -> str:
    if not problems:
        return "All jobs complete.\n"
    from ..adapt.report import problems_markdown

    return problems_markdown(problems)


def _confusion_section(confusion: dict) -> str:
    if not confusion:
        return ""
    if "error" in confusion:
        return f"\n### What the rows answered\n\nNot available: {confusion['error']}\n"
    from ..analysis.answer_confusion import confusion_markdown

    return (
        "\n### What the rows answered (test rows; in brackets: a uniform guess over each example's candidates)\n\n"
        "Every distractor differs from the right answer in one family and is the answer of a training "
        'composition (docs/replicate.md, "C4 diagnosed"). Task-blind: the accuracy expected of a model that '
        "ignores the task and scores the two answer words by fixed preferences (the floor of a model that "
        "transfers nothing, below 25 %). Trained pair: the chosen answer is a training composition's answer. "
        "Right answer's rank: 1 = chosen, by score.\n\n" + confusion_markdown(confusion)
    )


def summary_markdown(cfg: ReplicateConfig, body: dict, variants: dict) -> str:
    from ..analysis.claims import claims_markdown

    bb = body["backbone"]
    md = [
        f"# Replication at laptop scale ({cfg.source})\n",
        "Held-out test accuracy (%) of few-shot adaptation on the latent-skill benchmark. Cells: median over "
        "seeds (min–max, n). The learning rate of each row is chosen on the dev split (see the last table); "
        f"chance is {100 * (next(iter(variants.values())).get('chance') or 0):.0f} %.\n",
        f"Backbone (T5-LM analogue): {bb['section']['arch']}, {bb['section']['steps']} steps, final validation "
        f"loss {bb['final_val_loss']:.3f} per token ([curve](backbone_loss.png)).\n",
    ]
    for name, v in variants.items():
        md.append(f"\n## Variant `{name}`\n")
        md.append(
            f"{v['jobs']} complete jobs. Figures: " + ", ".join(f"[{k}]({f})" for k, f in v["figures"].items()) + "\n"
        )
        for k, tabs in sorted(v["tables_markdown"].items(), key=lambda kv: int(kv[0])):
            for tname, text in tabs.items():
                title = {
                    "table1": "Table 1 analogue",
                    "table4": "Table 4 analogue (modes)",
                    "zero_shot": "Zero-shot (MHR Table 5 analogue)",
                }[tname]
                md.append(f"\n### {title}" + (f", k = {k}" if k != "0" else "") + "\n\n" + text)
        for k, verdicts in sorted(v.get("_verdicts", {}).items()):
            md.append(f"\n### Claims at k = {k} (paired over tasks x seeds)\n\n" + claims_markdown(verdicts))
        for k, spread in sorted(v.get("world_spread", {}).items()):
            md.append(
                f"\n### Spread across worlds, k = {k}: mean over tasks of the seed median (%)\n\n"
                + _spread_table(spread)
            )
        if v.get("pretraining"):
            md.append(
                "\n### Multi-task pretraining: learning rates (chosen on validation loss) and val loss per "
                "world\n\n" + _pretraining_table(v["pretraining"])
            )
            if v["pretraining"].get("sensitivity"):
                md.append(
                    "\n### Sensitivity of the pretraining lr rule: what dev accuracy would have chosen\n\n"
                    + _sensitivity_table(v["pretraining"]["sensitivity"])
                )
        md.append(_confusion_section(v.get("answer_confusion") or {}))
        md.append(
            "\n### Routing recovery after multi-task pretraining (C7: "
            f"**{v['c7']['status']}**)\n\n" + _recovery_table(v["recovery"])
        )
        if v.get("pretrain_final_val_loss"):
            md.append(
                "\n### Multi-task pretraining: final validation loss per token\n\n| Method | val loss |\n|---|---|\n"
                + "".join(f"| {k} | {x:.3f} |\n" for k, x in v["pretrain_final_val_loss"].items() if x is not None)
            )
        md.append("\n### Learning rate per row (chosen on dev accuracy)\n\n" + _selection_table(v["selection"]))
        md.append("\n### Missing or failed jobs\n\n" + _problems(v["problems"]))
    t = body["timings"]
    if t.get("stage_runs"):
        last = t["stage_runs"][-1]
        md.append(
            "\n## Where the time went (last invocation)\n\n| Stage | seconds |\n|---|---|\n"
            + "".join(f"| {k} | {s:.0f} |\n" for k, s in last["stages_s"].items())
            + f"\nTotal {last['total_s']:.0f} s with {last['workers']} workers; load average "
            f"{', '.join(f'{x:.1f}' for x in last['load_average'])}.\n"
        )
    if t.get("adaptation_by_method"):
        md.append(
            "\n| Adaptation jobs | n | mean total s | train s | eval s | setup s |\n|---|---|---|---|---|---|\n"
            + "".join(
                f"| {k} | {x['jobs']} | {x['total_s']:.2f} | {x['train_s']:.2f} | {x['eval_s']:.2f} | "
                f"{x['setup_s']:.2f} |\n"
                for k, x in t["adaptation_by_method"].items()
            )
        )
    return "\n".join(md)
