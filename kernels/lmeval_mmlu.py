"""MMLU through dllm.serve with lm-evaluation-harness, against dllm.eval mmlu.

    python kernels/lmeval_mmlu.py tasks --data ../shared/data/mmlu --subjects S [S ...] --out DIR
    python kernels/lmeval_mmlu.py compare --samples LM_EVAL_OUTPUT_DIR --results DLLM.json

`tasks` writes lm-eval task files for MMLU subjects from a Hendrycks data folder, offline:
DIR/dllm_mmlu_<subject>.yaml (lm-eval's mmlu template: its description, doc_to_text,
choices " A".." D", dev examples as few-shot in order) and the subject's questions as JSON
lines, read by dllm.evaluate.read_questions, the reader of dllm.eval, so both tools see the
very same text. Pass DIR to lm_eval --include_path and the tasks dllm_mmlu_<subject>.

`compare` reads lm_eval --log_samples output (samples_dllm_mmlu_<subject>_*.jsonl) and a
dllm.eval mmlu --out results file and prints, per subject and overall, the questions whose
choice differs, the largest difference of a choice's log-likelihood, and both accuracies.
The exact commands and the figures are in docs/serving.md ("MMLU through the server").
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dllm.evaluate import LETTERS, read_questions  # noqa: E402
from dllm.mmlu import header  # noqa: E402

# lm-eval's mmlu doc_to_text (tasks/mmlu/default/_default_template_yaml), a Jinja template
DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
               "\nD. {{choices[3]}}\nAnswer:")
TEMPLATE = """task: dllm_mmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {description}
doc_to_text: {doc_to_text}
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(data, subjects, out):
    out.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        files = {}
        for split in ("test", "dev"):
            path = out / f"{subject}_{split}.jsonl"
            with open(path, "w") as f:
                for q in read_questions(data / split / f"{subject}_{split}.csv"):
                    f.write(json.dumps({"question": q.question, "choices": list(q.choices),
                                        "answer": LETTERS.index(q.answer)}) + "\n")
            files[split] = path.resolve()
        (out / f"dllm_mmlu_{subject}.yaml").write_text(TEMPLATE.format(
            subject=subject, test=files["test"], dev=files["dev"],
            description=json.dumps(header(subject, "lm-eval")),
            doc_to_text=json.dumps(DOC_TO_TEXT)))
    print(f"wrote {len(subjects)} task(s) to {out}: --include_path {out} --tasks "
          + ",".join(f"dllm_mmlu_{s}" for s in subjects))


def lm_eval_scores(samples_dir, subject):
    """{doc_id: [loglikelihood of A..D]} of the newest samples file of the subject."""
    files = sorted(Path(samples_dir).rglob(f"samples_dllm_mmlu_{subject}_*.jsonl"))
    if not files:
        return None
    scores = {}
    for line in files[-1].read_text().splitlines():
        sample = json.loads(line)
        scores[sample["doc_id"]] = [float(r[0][0]) for r in sample["resps"]]
    return scores


def compare(samples_dir, results_path, max_length):
    """Print the comparison. Questions whose prompt either tool truncated are counted
    apart, their ids differ: dllm.eval cuts a prompt longer than the context minus the
    longest choice's ids but one from the left keeping BOS; lm-eval cuts context and
    choice (max_length - 1 ids, its model_args' max_length) from the left."""
    results = json.loads(Path(results_path).read_text())
    longest = max(len(ids) for ids in results["choice_tokens"].values())
    total = {"n": 0, "same": 0, "dllm": 0, "lm_eval": 0, "truncated": 0, "truncated_same": 0}
    worst = 0.0
    for subject, record in results["subjects"].items():
        theirs = lm_eval_scores(samples_dir, subject)
        if theirs is None:
            print(f"{subject}: no lm-eval samples")
            continue
        counts = dict.fromkeys(total, 0)
        for q in record["questions"]:
            if q["index"] not in theirs:
                continue
            ours, lm = q["logprobs"], theirs[q["index"]]
            lm_choice = LETTERS[max(range(4), key=lambda i: lm[i])]
            same = lm_choice == q["prediction"]
            counts["n"] += 1
            counts["dllm"] += q["correct"]
            counts["lm_eval"] += lm_choice == q["answer"]
            if q["truncated"] or q["prompt_tokens"] + longest > max_length - 1:
                counts["truncated"] += 1
                counts["truncated_same"] += same
                continue
            counts["same"] += same
            worst = max(worst, max(abs(a - b) for a, b in zip(ours, lm)))
            if not same:
                print(f"  {subject} #{q['index']}: dllm {q['prediction']} {ours}, "
                      f"lm-eval {lm_choice} {lm}")
        report(subject, counts)
        for key in total:
            total[key] += counts[key]
    if total["n"]:
        report("all", total)
        print(f"largest difference of a choice's log-likelihood (prompts not truncated): "
              f"{worst:.2e}")


def report(name, c):
    n, whole = c["n"], c["n"] - c["truncated"]
    print(f"{name}: {n} questions; same choice in {c['same']} of the {whole} whose prompt "
          f"fits, {c['truncated_same']} of the {c['truncated']} truncated; accuracy "
          f"dllm.eval {c['dllm'] / n:.4f}, lm-eval {c['lm_eval'] / n:.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tasks", help="write lm-eval task files for MMLU subjects")
    t.add_argument("--data", type=Path, required=True, help="Hendrycks MMLU folder")
    t.add_argument("--subjects", nargs="+", required=True, help="subjects, e.g. marketing")
    t.add_argument("--out", type=Path, required=True, help="folder for the task files")
    c = sub.add_parser("compare", help="lm-eval's samples against dllm.eval's results")
    c.add_argument("--samples", type=Path, required=True, help="lm_eval --output_path")
    c.add_argument("--results", type=Path, required=True, help="dllm.eval mmlu --out file")
    c.add_argument("--max-length", type=int, default=256,
                   help="the max_length of lm-eval's model_args (default 256)")
    args = p.parse_args(argv)
    if args.command == "tasks":
        write_tasks(args.data, args.subjects, args.out)
    else:
        compare(args.samples, args.results, args.max_length)


if __name__ == "__main__":
    main()
