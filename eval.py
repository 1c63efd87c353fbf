"""Evaluate fine-tuned models the way the paper compares NTP and SFTMix, and draw the data map.

    python eval.py ppl      --model DIR --data heldout.jsonl [--split split.json] [--out per_example.jsonl]
    python eval.py mc       --model DIR --data medqa.jsonl [--out per_question.jsonl]
    python eval.py generate --model DIR --questions question.jsonl --out answers.jsonl
    python eval.py compare  RUN_A RUN_B ... --data heldout.jsonl [--mc medqa.jsonl] [--out table.md]
    python eval.py datamap  --dynamics dynamics.jsonl --out datamap.png [--split split.json]

ppl       Response perplexity over data.py's trained tokens (every assistant turn and its end-of-turn token),
          token-weighted over the file: PPL = exp(sum_i nll_i / sum_i |y_i|), nll_i = -sum_t log p(y_t | x, y_<t).
mc        Multiple-choice accuracy by option log-likelihood. One record per question (JSON lines or array):
              {"id": optional, "question": "...", "options": ["...", ...] or {"A": "...", "B": "...", ...},
               "answer": "B" or 1 (0-based index)}
          MedQA's own files work as they are (their letter "answer_idx" is read before "answer"); convert
          MedMCQA (opa..opd, cop) and PubMedQA (context + question, options yes / no / maybe) to this form.
          The user turn is the question, a blank line and one "A. text" line per option; option k's text y_k
          is scored as the assistant's reply: LL_k = sum_t log p(y_t | prompt, y_<t). Accuracy is reported
          for argmax_k LL_k (summed) and argmax_k LL_k / |y_k| (length-normalised).
generate  MT-Bench questions {"question_id", "category", "turns": [...]} -> FastChat model answers
          {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"},
          ready for FastChat's judge. Turn k sees the model's own answers to turns 1..k-1.
compare   One Markdown table of the above for several runs (model or run directories), side by side.
datamap   Confidence vs variability of every training example, coloured by split (needs matplotlib).

Under `torchrun --nproc_per_node N eval.py ...` the passes over data are sharded over ranks; rank 0 writes.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M
import sftmix
from data import IGNORE, InputError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # bf16 autocast on CUDA, plain fp32 on CPU
    rank: int
    world: int


def setup() -> Runtime:
    """One process, or one per GPU under torchrun (WORLD_SIZE > 1: nccl on CUDA, gloo on CPU)."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Runtime(device, torch.bfloat16 if cuda else None, dist.get_rank() if world > 1 else 0, world)


def model_dir(path) -> Path:
    """An HF model directory as given, or a run directory's final/ checkpoint."""
    path = Path(path)
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: config.json: not found; expected an HF model directory "
                        f"or a run directory with final/")
    return path


def load_model(path, rt: Runtime) -> M.Transformer:
    return M.load_pretrained(path, device=rt.device).eval()


def read_split(path) -> dict:
    """split.json -> {"confident": set of ids, "unconfident": set of ids}."""
    return {half: set(ids) for half, ids in sftmix.read_split(path).items()}


# ----------------------------------------------------------------------------- ppl

def token_weighted(results: dict, ids) -> dict:
    """NLL per token = sum_i nll_i / sum_i |y_i| over ids, and PPL = exp(NLL per token)."""
    nll, n = sum(results[i][0] for i in ids), sum(results[i][1] for i in ids)
    return {"examples": len(ids), "tokens": n, "nll_per_token": nll / n, "ppl": math.exp(nll / n)}


def evaluate_ppl(model, samples, rt, batch_size=8, split=None):
    """(summary {"all": ..., and per half with a split}, per-example rows {id, nll, tokens, ppl[, half]})."""
    members = {half: [s.id for s in samples if s.id in ids] for half, ids in (split or {}).items()}
    for half, ids in members.items():
        if not ids:
            raise InputError(f'--split: "{half}": none of its ids is an example of --data')
    results = sftmix.response_nll(model, samples, batch_size, rt.device, rt.amp_dtype, desc="ppl")  # {id: (nll, n)}
    summary = {"all": token_weighted(results, list(results))}
    summary |= {half: token_weighted(results, ids) for half, ids in members.items()}
    half_of = {i: half for half, ids in members.items() for i in ids}
    rows = [{"id": s.id, "nll": results[s.id][0], "tokens": results[s.id][1],
             "ppl": sftmix.perplexity(*results[s.id])} | ({"half": half_of.get(s.id)} if split else {})
            for s in samples]
    return summary, rows


# ----------------------------------------------------------------------------- multiple choice

@dataclass
class Question:
    id: str
    question: str
    options: list  # option texts, in the order of LETTERS
    answer: int  # 0-based index of the correct option


def read_mc(path) -> list:
    """Multiple-choice questions of a JSON-lines or JSON-array file (format in the module docstring)."""
    questions = []
    for i, (where, r) in enumerate(data.read_records(Path(path))):  # [(file:line, record)]
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not r["question"].strip():
            raise InputError(f'{where}: "question": expected an object with a non-empty string "question"')
        options = r.get("options")
        options = dict(zip(LETTERS, options)) if isinstance(options, list) and len(options) <= len(LETTERS) else options
        if not (isinstance(options, dict) and len(options) >= 2 and list(options) == list(LETTERS[:len(options)])
                and all(isinstance(t, str) and t.strip() for t in options.values())):
            raise InputError(f'{where}: "options": expected 2 or more non-empty strings, as a list or as '
                            f'{{"A": text, "B": text, ...}} with keys A, B, C, ... in order')
        key = "answer_idx" if "answer_idx" in r else "answer"
        texts, answer, n = list(options.values()), r.get(key), len(options)
        if isinstance(answer, str) and answer.strip() in LETTERS[:n]:
            answer = LETTERS.index(answer.strip())
        elif not (type(answer) is int and 0 <= answer < n):
            raise InputError(f'{where}: "{key}": expected one of {", ".join(LETTERS[:n])} or an index 0..{n - 1}, '
                            f"got {json.dumps(answer)}")
        questions.append(Question(str(r.get("id", f"{Path(path).name}:{i}")), r["question"], texts, answer))
    return questions


def mc_prompt(q: Question) -> str:
    """The user turn: the question, a blank line, then one 'A. text' line per option."""
    return q.question + "\n\n" + "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.options))


def mc_samples(questions, tok, prompt_format=None) -> list:
    """One Sample per (question i, option k), id "i:k": prompt + option ids, trained on the option tokens only.

    ids = prompt (P tokens, ending with the assistant header) + y (the option text's tokens);
    labels are pre-shifted: labels[t] = ids[t + 1] for t >= P - 1, IGNORE before.
    """
    samples = []
    for i, q in enumerate(questions):
        prompt = data.encode_prompt([{"role": "user", "content": mc_prompt(q)}], tok, prompt_format)
        for k, text in enumerate(q.options):
            ids = prompt + tok.encode(text)
            samples.append(data.Sample(f"{i}:{k}", ids[:-1], [IGNORE] * (len(prompt) - 1) + ids[len(prompt):]))
    return samples


def option_logliks(model, tok, questions, rt, prompt_format=None, batch_size=8) -> list:
    """Per question, per option: (log p(y | prompt) = sum_t log p(y_t | prompt, y_<t), |y|)."""
    results = sftmix.response_nll(model, mc_samples(questions, tok, prompt_format), batch_size,
                                  rt.device, rt.amp_dtype, desc="mc")  # {"i:k": (nll, n)}
    return [[(-results[f"{i}:{k}"][0], results[f"{i}:{k}"][1]) for k in range(len(q.options))]
            for i, q in enumerate(questions)]


def mc_accuracy(questions, logliks) -> tuple:
    """Accuracy of argmax_k log p(y_k | x) (summed) and of argmax_k log p(y_k | x) / |y_k| (length-normalised)."""
    rows = []
    for q, scores in zip(questions, logliks):
        summed = [ll for ll, _ in scores]
        normed = [ll / n for ll, n in scores]
        rows.append({"id": q.id, "answer": LETTERS[q.answer], "pred_sum": LETTERS[int(np.argmax(summed))],
                     "pred_norm": LETTERS[int(np.argmax(normed))], "loglik": summed, "tokens": [n for _, n in scores]})
    summary = {"questions": len(rows),
               "accuracy_sum": sum(r["pred_sum"] == r["answer"] for r in rows) / len(rows),
               "accuracy_norm": sum(r["pred_norm"] == r["answer"] for r in rows) / len(rows)}
    return summary, rows


# ----------------------------------------------------------------------------- generate (MT-Bench)

def read_questions(path) -> list:
    """MT-Bench questions: objects with "question_id" and "turns" (a non-empty list of strings)."""
    questions, seen = [], set()
    for where, r in data.read_records(Path(path)):
        if not isinstance(r, dict) or "question_id" not in r:
            raise InputError(f'{where}: "question_id": missing; expected an object with "question_id" and "turns"')
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(f'{where}: "turns": expected a non-empty list of non-empty strings')
        if r["question_id"] in seen:
            raise InputError(f'{where}: "question_id": duplicate {json.dumps(r["question_id"])}')
        seen.add(r["question_id"])
        questions.append(r)
    return questions


def conversation(turns, answers) -> list:
    """Messages user 1, assistant 1, ..., user k from k questions and the model's k - 1 answers so far."""
    messages = []
    for user, answer in zip(turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": turns[len(answers)]}]


def answer_questions(model, tok, questions, rt, prompt_format=None, max_new_tokens=1024, temperature=0.0,
                     top_p=1.0, batch_size=8, seed=0) -> list:
    """The model's answers, a list of turn texts per question, on every rank (questions sharded over ranks).

    Turn by turn: all first turns (batched, sorted by prompt length so little is padding), then all second
    turns with each conversation holding the model's own first answer, and so on. KV-cached, greedy at
    temperature 0; the end-of-turn token is dropped and the text stripped, as FastChat does.
    """
    stops = data.stop_ids(tok, prompt_format)
    answers = {i: [] for i in data.shard(list(range(len(questions))), rt.rank, rt.world)}
    for turn in range(max(len(q["turns"]) for q in questions)):
        prompts = {i: data.encode_prompt(conversation(questions[i]["turns"][:turn + 1], a), tok, prompt_format)
                   for i, a in answers.items() if turn < len(questions[i]["turns"])}
        order = sorted(prompts, key=lambda i: len(prompts[i]))
        batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
        for j, batch in enumerate(tqdm(batches, desc=f"generate turn {turn + 1}", disable=rt.rank != 0)):
            with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
                new = M.generate(model, [prompts[i] for i in batch], max_new_tokens, temperature, top_p,
                                 eos_ids=stops, seed=seed + 1000 * turn + j)
            for i, ids in zip(batch, new):
                answers[i].append(tok.decode(ids[:-1] if ids and ids[-1] in stops else ids).strip())
    if rt.world > 1:
        parts = [None] * rt.world
        dist.all_gather_object(parts, answers)
        answers = {i: a for part in parts for i, a in part.items()}
    return [answers[i] for i in range(len(questions))]


def answer_records(questions, answers, model_id) -> list:
    """FastChat's model-answer records."""
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": time.time()} for q, a in zip(questions, answers)]


# ----------------------------------------------------------------------------- compare

def markdown_table(names, metrics) -> str:
    """| metric | A | B | B − A | B ÷ A |, and for each further run X: X − A, X ÷ A."""
    head = ["metric", *names] + [h for n in names[1:] for h in (f"{n} − {names[0]}", f"{n} ÷ {names[0]}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, values in metrics.items():
        a = values[0]
        diffs = [c for v in values[1:] for c in (f"{v - a:+.4f}", f"{v / a:.4f}" if a else "—")]
        lines.append("| " + " | ".join([metric, *(f"{v:.4f}" for v in values), *diffs]) + " |")
    return "\n".join(lines) + "\n"


def compare(args, rt) -> str:
    """Each run's ppl on --data (per half with --split) and accuracy on --mc, as one Markdown table."""
    dirs = [model_dir(r) for r in args.runs]
    names = args.names or [Path(r).resolve().name for r in args.runs]
    if len(names) != len(dirs):
        raise InputError(f"--names: expected {len(dirs)} names, one per run, got {len(names)}")
    split = read_split(args.split) if args.split else None
    mc = read_mc(args.mc) if args.mc else None
    metrics = {}
    for d in dirs:
        tok = data.load_tokenizer(d)
        samples, _ = data.load_dataset(args.data, tok, args.prompt_format, args.max_len)
        model = load_model(d, rt)
        summary, _ = evaluate_ppl(model, samples, rt, args.batch_size, split)
        for part, s in summary.items():
            suffix = "" if part == "all" else f" ({part})"
            metrics.setdefault(f"ppl{suffix} ↓", []).append(s["ppl"])
            metrics.setdefault(f"NLL per token{suffix} ↓", []).append(s["nll_per_token"])
        if mc:
            acc, _ = mc_accuracy(mc, option_logliks(model, tok, mc, rt, args.prompt_format, args.batch_size))
            metrics.setdefault("mc accuracy, summed log-lik ↑", []).append(acc["accuracy_sum"])
            metrics.setdefault("mc accuracy, length-normalised ↑", []).append(acc["accuracy_norm"])
        del model
    return markdown_table(names, metrics)


# ----------------------------------------------------------------------------- datamap

def datamap(dynamics, out, split_path=None):
    """Scatter of confidence Conf = -mean_c Perp_c (y-axis) against variability std_c Perp_c (x-axis),
    coloured by half, with the median confidence drawn: the split is the line through the cloud."""
    ids, perps = sftmix.read_dynamics(dynamics)
    conf, var = sftmix.confidence(perps), sftmix.variability(perps)  # (N,), (N,)
    if split_path:
        halves = read_split(split_path)
        missing = [i for i in ids if i not in halves["confident"] | halves["unconfident"]]
        if missing:
            raise InputError(f'{split_path}: id {json.dumps(missing[0])} of {dynamics} is in neither half')
    else:
        halves = dict(zip(("confident", "unconfident"), map(set, sftmix.split_by_confidence(ids, conf))))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("datamap needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for half, colour in (("confident", "tab:blue"), ("unconfident", "tab:orange")):
        mask = np.array([i in halves[half] for i in ids])
        ax.scatter(var[mask], conf[mask], s=10, alpha=0.6, color=colour, label=f"{half} ({mask.sum()})")
    ax.axhline(np.median(conf), color="black", linestyle="--", linewidth=1, label="median confidence")
    ax.set_xscale("symlog")  # perplexities span orders of magnitude: a few outliers would flatten the cloud
    ax.set_yscale("symlog")
    ax.set_xlim(left=0)  # variability >= 0, confidence <= -1
    ax.set_ylim(top=0)
    ax.set(xlabel="variability: std over checkpoints of Perp(y|x) (symlog)",
           ylabel="confidence: −mean over checkpoints of Perp(y|x) (symlog)",
           title=f"Data map: {len(ids)} examples, {perps.shape[1]} checkpoints")
    ax.legend()
    with data.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def cmd_ppl(args, rt, say) -> list:
    path = model_dir(args.model)
    tok = data.load_tokenizer(path)
    samples, _ = data.load_dataset(args.data, tok, args.prompt_format, args.max_len)
    split = read_split(args.split) if args.split else None
    summary, rows = evaluate_ppl(load_model(path, rt), samples, rt, args.batch_size, split)
    for part, s in summary.items():
        say(f"{part:>11}: ppl {s['ppl']:.4f}  NLL/token {s['nll_per_token']:.4f}  "
            f"({s['examples']} examples, {s['tokens']} response tokens)")
    return rows


def cmd_mc(args, rt, say) -> list:
    questions = read_mc(args.data)  # bad input fails before the model loads
    path = model_dir(args.model)
    tok = data.load_tokenizer(path)
    logliks = option_logliks(load_model(path, rt), tok, questions, rt, args.prompt_format, args.batch_size)
    summary, rows = mc_accuracy(questions, logliks)
    say(f"{summary['questions']} questions: accuracy {summary['accuracy_sum']:.4f} (summed log-likelihood), "
        f"{summary['accuracy_norm']:.4f} (length-normalised)")
    return rows


def cmd_generate(args, rt, say) -> list:
    questions = read_questions(args.questions)  # bad input fails before the model loads
    path = model_dir(args.model)
    answers = answer_questions(load_model(path, rt), data.load_tokenizer(path), questions, rt, args.prompt_format,
                               args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return answer_records(questions, answers, args.model_id or Path(args.model).resolve().name)


def cmd_compare(args, rt, say):
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the table alone: `> table.md` works
        table = compare(args, rt)
    if rt.rank == 0 and args.out:
        with data.atomic_path(args.out) as tmp:
            tmp.write_text(table, "utf-8")
    say(table, end="")


def cmd_datamap(args, rt, say):
    if rt.rank == 0:
        datamap(args.dynamics, args.out, args.split)
    say(f"wrote {args.out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    D = argparse.ArgumentDefaultsHelpFormatter
    ppl = sub.add_parser("ppl", formatter_class=D, help="response perplexity, overall, per example, per half")
    mc = sub.add_parser("mc", formatter_class=D, help="multiple-choice accuracy by option log-likelihood")
    gen = sub.add_parser("generate", formatter_class=D, help="answers to MT-Bench questions, FastChat format")
    cmp = sub.add_parser("compare", formatter_class=D, help="Markdown table of several runs side by side")
    dm = sub.add_parser("datamap", formatter_class=D, help="confidence vs variability picture (matplotlib)")
    for s, run in ((ppl, cmd_ppl), (mc, cmd_mc), (gen, cmd_generate), (cmp, cmd_compare), (dm, cmd_datamap)):
        s.set_defaults(run=run)
    for s in (ppl, mc, gen):
        s.add_argument("--model", required=True, help="HF model directory, or a run directory with final/")
    cmp.add_argument("runs", nargs="+", help="model or run directories; the first is the baseline A")
    cmp.add_argument("--names", nargs="+", help="column names, one per run (None: the directories' names)")
    cmp.add_argument("--mc", help="multiple-choice file; adds accuracy rows")
    for s, what in ((ppl, "conversations (alpaca / sharegpt / messages)"), (mc, "multiple-choice questions"),
                    (cmp, "held-out conversations for ppl")):
        s.add_argument("--data", required=True, help=what)
    for s in (ppl, cmp):
        s.add_argument("--split", help="split.json; adds ppl per half")
        s.add_argument("--max-len", type=int, default=data.MAX_LEN, help="tokens per example; longer cut on the right")
    for s in (ppl, mc, gen, cmp):
        s.add_argument("--prompt-format", choices=data.PROMPT_FORMATS, help="None: from the chat template")
        s.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    for s, what in ((ppl, "per-example JSONL"), (mc, "per-question JSONL"), (cmp, "Markdown file for the table")):
        s.add_argument("--out", help=what)
    gen.add_argument("--questions", required=True, help="MT-Bench question.jsonl")
    gen.add_argument("--out", required=True, help="answers JSONL, e.g. data/mt_bench/model_answer/NAME.jsonl")
    gen.add_argument("--model-id", help="model_id in the answers (None: the model directory's name)")
    gen.add_argument("--max-new-tokens", type=int, default=1024, help="per turn")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed when temperature > 0")
    dm.add_argument("--dynamics", required=True, help="dynamics.jsonl of the reference run")
    dm.add_argument("--split", help="split.json to colour by (None: the median split of the dynamics)")
    dm.add_argument("--out", required=True, help="PNG to write")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        rt = setup()
        say = print if rt.rank == 0 else (lambda *a, **k: None)
        rows = args.run(args, rt, say)
        if rows is not None and rt.rank == 0 and args.out:  # per-example / per-question / answer JSONL
            data.write_json(args.out, rows, lines=True)
            say(f"wrote {args.out}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
