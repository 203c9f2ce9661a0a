"""C4 control: do the zero-shot models answer *seen* compositions, and which distractors do they pick there?

The held-out tasks' distractors are all answers of training compositions (docs/replicate.md, "C4 diagnosed").
This script asks the same zero-shot models (replicate's zero-shot jobs with 0 multi-task steps: Poly/MHR with
their modules averaged, mode mu; LoRA as pretrained) the 12 *training* compositions, on fresh word sequences,
with the prompt templates of the held-out tasks and candidates built exactly as for the held-out tasks (the
answer and 3 answers one family away). There, some distractors are answers of the unseen (held-out)
compositions, so the confusion table tells whether a model avoids unseen pairs (a prior over the
compositions it was trained on) and whether it follows the prompt at all when the composition is familiar.

    python benchmarks/c4_seen_compositions.py --run runs/c4 --variant prompt \
        --out benchmarks/results/c4_diagnosis/seen_compositions.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

N_PER_COMPOSITION = 50


def seen_rows(mixture: str, tok, n: int) -> tuple[list[dict], dict]:
    """Rank-classification rows for every training composition and their decoded Examples."""
    from data_prep import latent_skills as ls
    from tensorpoly_ds.analysis.answer_confusion import Example

    rows, examples = [], {}
    for p, c in ls.TRAIN:
        task = ls.dataset_name(mixture, p, c)
        rng = random.Random(f"c4-control|{p}|{c}|choices")
        for i, words in enumerate(ls._sequences(f"c4-control|{p}|{c}", n)):
            choices, label = ls._candidates(p, c, words, rng)
            for template in ls.HELD_TEMPLATES[mixture]:
                rows.append(
                    {
                        "task_name": task,
                        "template": template,
                        "example_id": i,
                        "input_ids": tok.encode(ls._prompt(template, p, c, words), add_special_tokens=False),
                        "choice_ids": [tok.encode(x, add_special_tokens=False) + [tok.eos_token_id] for x in choices],
                        "label": label,
                    }
                )
                examples[(task, template, i)] = Example(tuple(words), tuple(choices), label)
    return rows, examples


def swapped_rows(mixture: str, tok) -> list[dict]:
    """The held-out tasks' eval examples (words and candidates unchanged) under the prompt of every held-out
    composition: a model that reads the prompt changes its choice when the prompt names other skills."""
    from data_prep import latent_skills as ls
    from tensorpoly_ds.analysis.answer_confusion import sequence_words

    rows = []
    for p, c in ls.HELD_OUT:
        task = ls.dataset_name(mixture, p, c)
        for template in ls.HELD_TEMPLATES[mixture]:
            for i, rec in enumerate(ls.records(f"{task}_{template}", "validation")):
                words = list(sequence_words(rec["inputs_pretokenized"]))
                choices = rec["answer_choices"]
                for q, d in ls.HELD_OUT:
                    rows.append(
                        {
                            "task_name": task,
                            "template": template,
                            "example_id": i,
                            "prompt": f"{q}+{d}",
                            "input_ids": tok.encode(ls._prompt(template, q, d, words), add_special_tokens=False),
                            "choice_ids": [
                                tok.encode(x, add_special_tokens=False) + [tok.eos_token_id] for x in choices
                            ],
                            "label": choices.index(rec["targets_pretokenized"]),
                        }
                    )
    return rows


def prompt_dependence(rows: list[dict], records: list[dict]) -> dict:
    """Share of (example, other prompt) pairs whose choice equals the choice under the example's own prompt, and
    the accuracy under the own and under the other prompts."""
    from data_prep import latent_skills as ls

    own_prompt = {ls.dataset_name("latent_skills", p, c): f"{p}+{c}" for p, c in ls.HELD_OUT}
    own_prompt.update({ls.dataset_name("latent_skills_noprompt", p, c): f"{p}+{c}" for p, c in ls.HELD_OUT})
    own = {
        (r["task_name"], r["template"], r["example_id"]): rec["prediction"]
        for r, rec in zip(rows, records)
        if r["prompt"] == own_prompt[r["task_name"]]
    }
    same, acc_own, acc_other, n_other = 0, 0, 0, 0
    for r, rec in zip(rows, records):
        key = (r["task_name"], r["template"], r["example_id"])
        if r["prompt"] == own_prompt[r["task_name"]]:
            acc_own += rec["correct"]
        else:
            n_other += 1
            same += rec["prediction"] == own[key]
            acc_other += rec["correct"]
    return {
        "same_choice_under_other_prompts": same / n_other,
        "accuracy_own_prompt": acc_own / len(own),
        "accuracy_other_prompts": acc_other / n_other,
        "examples": len(own),
    }


def zero_shot_jobs(run: Path, variant: str) -> dict[str, dict]:
    """One zero-shot job (0 multi-task steps, seed 0) per method label from replicate's job table."""
    from tensorpoly_ds.adapt.spec import AdaptJob

    fields = {f.name for f in dataclasses.fields(AdaptJob)}
    out = {}
    for line in (run / "adapt" / variant / "jobs.jsonl").read_text().splitlines():
        job = json.loads(line)["job"]
        if job.get("k") == 0 and not job.get("multitask_steps") and job.get("seed") == 0:
            label = job.get("label") or job["method"]
            out.setdefault(f"{label} ({job['mode']}, 0-shot)", {k: v for k, v in job.items() if k in fields})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a replicate OUT with a zero-shot section")
    ap.add_argument("--variant", default="prompt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=N_PER_COMPOSITION, help="sequences per training composition")
    args = ap.parse_args()

    import tempfile

    from data_prep.manifest import read_manifest
    from data_prep.tokenizer import load_from_info
    from tensorpoly_ds.adapt.job import setup_model
    from tensorpoly_ds.adapt.spec import AdaptJob
    from tensorpoly_ds.analysis import answer_confusion as ac
    from tensorpoly_ds.evaluation.rank_classification import evaluate
    from tpds_common.files import atomic_write_json

    jobs = zero_shot_jobs(args.run, args.variant)
    if not jobs:
        raise SystemExit(f"{args.run}/adapt/{args.variant}/jobs.jsonl: no zero-shot job with 0 multi-task steps")
    data_dir = next(iter(jobs.values()))["data_dir"]
    manifest = read_manifest(data_dir)
    truth, held = manifest.extra["latent_skills"], list(manifest.held_out)
    tok = load_from_info(Path(data_dir), manifest.tokenizer["kind"], manifest.tokenizer["name_or_path"])
    rows, examples = seen_rows(manifest.mixture, tok, args.n)
    result = {"run": str(args.run), "variant": args.variant, "per_composition": args.n, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in jobs.items():
            job = AdaptJob.from_dict({**spec, "out_dir": tmp})
            model, _ = setup_model(job, manifest.tokenizer["vocab_size"])
            records = evaluate(model, rows, batch_size=job.eval_batch_size, length_norm=job.length_norm)
            counts = ac.empty_counts()
            by_task: dict[str, list[dict]] = {}
            for rec in records:
                by_task.setdefault(rec["task_name"], []).append(rec)
            for task, recs in by_task.items():
                path = Path(tmp) / "predictions.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in recs))
                own = {(t, i): ex for (tt, t, i), ex in examples.items() if tt == task}
                # the composition's own template name stands for the task in the manifest's table
                truth_t = {**truth, "task_skills": {**truth["task_skills"], task: truth["task_skills"][f"{task}_say"]}}
                ac.merge_counts(counts, ac.predictions_confusion(path, own, truth_t, task, held))
            result["rows"][name] = ac.confusion_table(counts)
            swapped = swapped_rows(manifest.mixture, tok)
            dep = prompt_dependence(
                swapped, evaluate(model, swapped, batch_size=job.eval_batch_size, length_norm=job.length_norm)
            )
            result["rows"][name]["prompt_swap"] = dep
            print(
                f"{name}: held-out examples under the other held-out tasks' prompts: same choice "
                f"{100 * dep['same_choice_under_other_prompts']:.1f} %, accuracy own prompt "
                f"{100 * dep['accuracy_own_prompt']:.1f} %, other prompts {100 * dep['accuracy_other_prompts']:.1f} %"
            )
            print(f"{name}: seen compositions, accuracy {100 * result['rows'][name]['shares']['correct']:.1f} %")
    result["markdown"] = ac.confusion_markdown({n: {"all": t} for n, t in result["rows"].items()})
    print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
