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
        lines.append(f"| {label} | {r['score']:+.3f} | {r['null_mean']:+.3f} | {r['p_value']:.3g} | "
                     f"{r['matching']:+.3f} | [{r['plot']}]({r['plot']}) |")
    return "\n".join(lines) + "\n"


def _selection_table(selection: list[dict]) -> str:
    lrs = sorted({lr for s in selection for lr in s["lrs"]}, key=float)
    lines = ["| Row | k | chosen lr | " + " | ".join(f"dev @ {lr} | test @ {lr}" for lr in lrs) + " |",
             "|---|---|---|" + "---|---|" * len(lrs)]
    for s in selection:
        cells = []
        for lr in lrs:
            st = s["lrs"].get(lr)
            cells += [f"{100 * st['dev']:.1f}", f"{100 * st['test']:.1f}"] if st else ["", ""]
        lines.append(f"| {s['row']} | {s['k']} | {s['chosen_lr']:g} | " + " | ".join(cells) + " |")
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

    return ("\n### What the rows answered (test rows; in brackets: a uniform guess over each example's candidates)\n\n"
            "Every distractor differs from the right answer in one family and is the answer of a training "
            "composition (docs/replicate.md, \"C4 diagnosed\"). Task-blind: the accuracy expected of a model that "
            "ignores the task and scores the two answer words by fixed preferences (the floor of a model that "
            "transfers nothing, below 25 %). Trained pair: the chosen answer is a training composition's answer. "
            "Right answer's rank: 1 = chosen, by score.\n\n" + confusion_markdown(confusion))


def summary_markdown(cfg: ReplicateConfig, body: dict, variants: dict) -> str:
    from ..analysis.claims import claims_markdown

    bb = body["backbone"]
    md = [f"# Replication at laptop scale ({cfg.source})\n",
          "Held-out test accuracy (%) of few-shot adaptation on the latent-skill benchmark. Cells: median over "
          "seeds (min–max, n). The learning rate of each row is chosen on the dev split (see the last table); "
          f"chance is {100 * (next(iter(variants.values())).get('chance') or 0):.0f} %.\n",
          f"Backbone (T5-LM analogue): {bb['section']['arch']}, {bb['section']['steps']} steps, final validation "
          f"loss {bb['final_val_loss']:.3f} per token ([curve](backbone_loss.png)).\n"]
    for name, v in variants.items():
        md.append(f"\n## Variant `{name}`\n")
        md.append(f"{v['jobs']} complete jobs. Figures: " +
                  ", ".join(f"[{k}]({f})" for k, f in v["figures"].items()) + "\n")
        for k, tabs in sorted(v["tables_markdown"].items(), key=lambda kv: int(kv[0])):
            for tname, text in tabs.items():
                title = {"table1": "Table 1 analogue", "table4": "Table 4 analogue (modes)",
                         "zero_shot": "Zero-shot (MHR Table 5 analogue)"}[tname]
                md.append(f"\n### {title}" + (f", k = {k}" if k != "0" else "") + "\n\n" + text)
        for k, verdicts in sorted(v.get("_verdicts", {}).items()):
            md.append(f"\n### Claims at k = {k} (paired over tasks x seeds)\n\n" + claims_markdown(verdicts))
        md.append(_confusion_section(v.get("answer_confusion") or {}))
        md.append("\n### Routing recovery after multi-task pretraining (C7: "
                  f"**{v['c7']['status']}**)\n\n" + _recovery_table(v["recovery"]))
        if v.get("pretrain_final_val_loss"):
            md.append("\n### Multi-task pretraining: final validation loss per token\n\n| Method | val loss |\n|---|---|\n"
                      + "".join(f"| {k} | {x:.3f} |\n" for k, x in v["pretrain_final_val_loss"].items()
                                if x is not None))
        md.append("\n### Learning rate per row (chosen on dev accuracy)\n\n" + _selection_table(v["selection"]))
        md.append("\n### Missing or failed jobs\n\n" + _problems(v["problems"]))
    t = body["timings"]
    if t.get("stage_runs"):
        last = t["stage_runs"][-1]
        md.append("\n## Where the time went (last invocation)\n\n| Stage | seconds |\n|---|---|\n"
                  + "".join(f"| {k} | {s:.0f} |\n" for k, s in last["stages_s"].items())
                  + f"\nTotal {last['total_s']:.0f} s with {last['workers']} workers; load average "
                  f"{', '.join(f'{x:.1f}' for x in last['load_average'])}.\n")
    if t.get("adaptation_by_method"):
        md.append("\n| Adaptation jobs | n | mean total s | train s | eval s | setup s |\n|---|---|---|---|---|---|\n"
                  + "".join(f"| {k} | {x['jobs']} | {x['total_s']:.2f} | {x['train_s']:.2f} | {x['eval_s']:.2f} | "
                            f"{x['setup_s']:.2f} |\n" for k, x in t["adaptation_by_method"].items()))
    return "\n".join(md)
