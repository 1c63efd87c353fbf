"""Evaluate fine-tuned models the way the paper compares NTP and SFTMix (tables and pictures of
several runs: scripts/report.py).

    python eval.py ppl      --model DIR --data heldout.jsonl [--split split.json] [--out rows.jsonl]
    python eval.py mc       --model DIR --data medmcqa.json [--out per_question.jsonl]
    python eval.py generate --model DIR --questions question.jsonl --out model_answer/NAME.jsonl
    python eval.py generate --model DIR --questions alpaca_eval.json --out NAME/model_outputs.json

ppl       Response perplexity over data.py's trained tokens, token-weighted over the file.
mc        Multiple-choice accuracy by option log-likelihood: MedQA, MedMCQA, PubMedQA as released.
generate  MT-Bench's model answers or AlpacaEval's model outputs, decoded as their judges expect.

Each command loads the weights in --dtype (auto: bf16 on CUDA, fp32 on CPU) and computes in it with
no autocast: one copy of the weights, and a KV cache of that dtype. Under `torchrun --nproc_per_node
N eval.py ...` its passes over data are sharded over ranks; rank 0 writes. Every --out is checked
before any work: its directory is made if missing; a directory, a place that cannot be written, or
one of the command's input files is refused.
"""

import argparse
import json
import os
import time
import uuid
from dataclasses import dataclass
from functools import partial
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
SCORES = ("summed", "per-token", "per-character")
MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
# FastChat's temperature_config (fastchat/llm_judge/common.py): the temperature its gen_model_answer
# samples each MT-Bench category at; other categories, and AlpacaEval, get DEFAULT_TEMPERATURE.
MT_BENCH_TEMPERATURE = {
    **dict.fromkeys(("writing", "roleplay"), 0.7),
    **dict.fromkeys(("extraction", "math", "coding", "reasoning", "arena-hard-200"), 0.0),
    **dict.fromkeys(("stem", "humanities"), 0.1),
}
DEFAULT_TEMPERATURE = 0.7
MAX_NEW_TOKENS = {"mt_bench": 1024, "alpaca_eval": 2048}


# ----------------------------------------------------------------------------- model commands


@dataclass
class Runtime:
    device: torch.device
    # the weights', the compute's and the KV cache's: no autocast, no second copy
    dtype: torch.dtype
    rank: int
    world: int

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs)


def setup(dtype="auto") -> Runtime:
    """One process, or one per GPU under torchrun (WORLD_SIZE > 1: nccl on CUDA, gloo on CPU)."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    return Runtime(device, M.compute_dtype(dtype, device), rank, world)


def load_model(path, rt: Runtime) -> M.Transformer:
    """The model in rt.dtype on rt.device: the one copy of its weights that eval computes with."""
    return M.load_pretrained(path, dtype=rt.dtype, device=rt.device).eval()


def write_out(args, rt, obj, lines=True) -> None:
    """--out, when given, on rank 0: JSON lines of a list, or (lines=False) one JSON document."""
    if rt.rank == 0 and args.out:
        data.write_json(args.out, obj, lines=lines)
        rt.say(f"wrote {args.out}")


def read_split(path) -> dict:
    """split.json -> {"confident": set of ids, "unconfident": set of ids}, no id in both."""
    split = {half: set(ids) for half, ids in sftmix.read_split(path).items()}
    both = sorted(split["confident"] & split["unconfident"])
    if both:
        raise InputError(f"{path}: ids must be in one half: {len(both)} in both halves {both[:3]}")
    return split


# ----------------------------------------------------------------------------- ppl


def split_members(split, samples) -> dict:
    """{half: the ids of the samples in it, in data order} (empty without a split); a half that
    holds none of the samples is an InputError, raised before any model loads."""
    members = {half: [s.id for s in samples if s.id in ids] for half, ids in (split or {}).items()}
    for half, ids in members.items():
        if not ids:
            raise InputError(f'--split: "{half}": none of its ids is an example of --data')
    return members


def evaluate_ppl(model, samples, rt, batch_size=8, split=None):
    """(summary {"all": ..., and per half with a split},
    per-example rows {id, nll, tokens, ppl[, half]})."""
    members = split_members(split, samples)
    # {id: (nll, n)}
    results = sftmix.response_nll(model, samples, batch_size, rt.device, None, desc="ppl")
    summary = {"all": sftmix.token_weighted(results, list(results))}
    summary |= {half: sftmix.token_weighted(results, ids) for half, ids in members.items()}
    half_of = {i: half for half, ids in members.items() for i in ids}
    rows = []
    for s in samples:
        nll, n = results[s.id]
        row = {"id": s.id, "nll": nll, "tokens": n, "ppl": sftmix.perplexity(nll, n)}
        rows.append((row | {"half": half_of.get(s.id)}) if split else row)
    return summary, rows


def cmd_ppl(args, rt):
    split = read_split(args.split) if args.split else None
    path = M.model_dir(args.model)
    tok = data.load_tokenizer(path)
    samples, stats = data.load_dataset(
        args.data, tok, args.prompt_format, args.max_len, verbose=False
    )
    # checked before the model loads; the data's line follows once all is read
    split_members(split, samples)
    model = load_model(path, rt)
    rt.say(data.summary(stats))
    summary, rows = evaluate_ppl(model, samples, rt, args.batch_size, split)
    for part, s in summary.items():
        rt.say(
            f"{part:>11}: ppl {s['ppl']:.4f}  NLL/token {s['nll_per_token']:.4f}  "
            f"({s['examples']} examples, {s['tokens']} response tokens)"
        )
    write_out(args, rt, rows)


# ----------------------------------------------------------------------------- mc (multiple choice)


@dataclass
class Question:
    id: str
    question: str
    options: list  # option texts, in the order of LETTERS
    answer: int  # 0-based index of the correct option


def mc_records(path) -> list:
    """[(where, record)]: data.read_records, or PubMedQA's ori_pqal.json ({PMID: record})."""
    try:
        whole = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):  # read_records says what is wrong, if anything
        whole = None
    values = list(whole.values()) if isinstance(whole, dict) else []
    if values and all(isinstance(r, dict) and "QUESTION" in r for r in values):
        return [(f"{path}:{pmid}", r | {"id": pmid}) for pmid, r in whole.items()]
    return data.read_records(Path(path))


def medmcqa_base(path, records, base=None):
    """The number MedMCQA's "cop" gives the first option: 1 in its release (1..4), 0 in the HF copy
    (0..3). A file holding a 0 and no 4 is 0-based, a 4 and no 0 1-based; any other cannot tell
    (base must be given)."""
    medmcqa = [r for _, r in records if isinstance(r, dict) and "opa" in r]
    cops = {r["cop"] for r in medmcqa if type(r.get("cop")) is int}
    if base is not None or not cops:
        return base
    if (0 in cops) == (4 in cops):
        raise InputError(
            f'{path}: "cop": {"both 0 and 4" if 0 in cops else "neither 0 nor 4"} among '
            f"its values, so the file cannot tell 1-based answers (MedMCQA's release) "
            f"from 0-based ones (the HF copy); pass --cop-base 1 or 0"
        )
    return 0 if 0 in cops else 1


def nonblank(value) -> bool:
    """Whether value is a string with more than whitespace."""
    return isinstance(value, str) and bool(value.strip())


def mc_question(where, r, default_id, base) -> Question:
    """One question, its answer as a 0-based index, of any of these layouts:
    MedQA     {"question", "options": {"A": text, ...}, "answer_idx": "B"}
    MedMCQA   {"question", "opa", "opb", "opc", "opd", "cop"}, cop counting from base (medmcqa_base)
    PubMedQA  ori_pqal.json's {"QUESTION", "CONTEXTS", "final_decision"}, or the HF layout
              {"question", "context": {"contexts"}, "final_decision"}: options yes / no / maybe,
              the question asked as the contexts (one per line), a blank line, the question
    ours      {"question", "options": [...] or {"A": text, ...}, "answer": "B" or a 0-based index}
    """
    if not isinstance(r, dict):
        raise InputError(f"{where}: expected an object with a question")
    key, question, id_ = "question", r.get("question"), r.get("id", default_id)
    if "opa" in r:  # MedMCQA
        options, answer = [r.get(k) for k in MEDMCQA_OPTIONS], r.get("cop")
        if base is None or not (type(answer) is int and 0 <= answer - base < 4):
            counts = "from 1 as released, 0 in the HF copy"
            if base is not None:
                counts = f"this file counts from {base}"
            raise InputError(
                f'{where}: "cop": expected the correct option\'s number ({counts}), '
                f"got {json.dumps(answer)}"
            )
        answer -= base
    elif "final_decision" in r:  # PubMedQA: the HF layout, or ori_pqal.json's
        hf = "question" in r
        if hf:
            context = r.get("context") if isinstance(r.get("context"), dict) else {}
            id_, contexts = r.get("pubid", default_id), context.get("contexts")
        else:  # ori_pqal.json's
            key, question, contexts = "QUESTION", r.get("QUESTION"), r.get("CONTEXTS")
        if not (isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)):
            raise InputError(
                f"{where}: {'context.contexts' if hf else 'CONTEXTS'}: expected a list of strings"
            )
        if nonblank(question):
            question = "\n".join(contexts) + "\n\n" + question
        options, answer = PUBMEDQA_OPTIONS, r["final_decision"]
        if answer not in options:
            raise InputError(
                f'{where}: "final_decision": expected yes, no or maybe, got {json.dumps(answer)}'
            )
        answer = options.index(answer)
    else:  # MedQA, or ours
        options = r.get("options")
        if isinstance(options, list) and len(options) <= len(LETTERS):
            options = dict(zip(LETTERS, options))
        lettered = isinstance(options, dict) and list(options) == list(LETTERS[: len(options)])
        if not (lettered and len(options) >= 2):
            raise InputError(
                f'{where}: "options": expected 2 or more non-empty strings, as a list or as '
                f'{{"A": text, "B": text, ...}} with keys A, B, C, ... in order'
            )
        field = "answer_idx" if "answer_idx" in r else "answer"
        options, answer, n = list(options.values()), r.get(field), len(options)
        if isinstance(answer, str) and answer.strip() in LETTERS[:n]:
            answer = LETTERS.index(answer.strip())
        elif not (type(answer) is int and 0 <= answer < n):
            raise InputError(
                f'{where}: "{field}": expected one of {", ".join(LETTERS[:n])} or an index '
                f"0..{n - 1}, got {json.dumps(answer)}"
            )
    if not nonblank(question):
        raise InputError(f'{where}: "{key}": expected a non-empty string')
    if not all(map(nonblank, options)):
        raise InputError(f"{where}: options: expected non-empty strings")
    return Question(str(id_), question, options, answer)


def read_mc(path, cop_base=None) -> list:
    """Multiple-choice questions of a file in any layout of mc_question."""
    records, name = mc_records(path), Path(path).name
    if not records:
        raise InputError(f"{path}: no questions")
    base = medmcqa_base(path, records, cop_base)
    return [mc_question(where, r, f"{name}:{i}", base) for i, (where, r) in enumerate(records)]


def mc_prompt(q: Question) -> str:
    """The user turn: the question, a blank line, then one 'A. text' line per option."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question}\n\n{options}"


def mc_samples(questions, tok, prompt_format=None) -> list:
    """One Sample per (question i, option k), id "i:k", trained on the option only:

    ids = prompt (P tokens, ending with the assistant header) + y (the option text's tokens);
    labels are pre-shifted: labels[t] = ids[t + 1] for t >= P - 1, IGNORE before."""
    samples = []
    for i, q in enumerate(questions):
        prompt = data.encode_prompt([{"role": "user", "content": mc_prompt(q)}], tok, prompt_format)
        for k, text in enumerate(q.options):
            ids = prompt + tok.encode(text)
            labels = [IGNORE] * (len(prompt) - 1) + ids[len(prompt) :]
            samples.append(data.Sample(f"{i}:{k}", ids[:-1], labels))
    return samples


def option_logliks(model, tok, questions, rt, prompt_format=None, batch_size=8) -> list:
    """Per question, per option: (log p(y | prompt) = sum_t log p(y_t | prompt, y_<t), |y|)."""
    samples = mc_samples(questions, tok, prompt_format)
    # {"i:k": (nll, n)}
    results = sftmix.response_nll(model, samples, batch_size, rt.device, None, desc="mc")
    return [
        [(-results[f"{i}:{k}"][0], results[f"{i}:{k}"][1]) for k in range(len(q.options))]
        for i, q in enumerate(questions)
    ]


def mc_accuracy(questions, logliks) -> tuple:
    """Accuracy of argmax_k s_k for each score s: summed s_k = LL_k, per-token s_k = LL_k / |y_k|
    (tokens), per-character s_k = LL_k / len(y_k) (characters: lm-eval's acc_norm). Ties go to the
    first option."""
    rows = []
    for q, scores in zip(questions, logliks):
        ll, tokens = [ll for ll, _ in scores], [n for _, n in scores]
        chars = [len(t) for t in q.options]
        by = dict(zip(SCORES, [ll, np.divide(ll, tokens), np.divide(ll, chars)]))
        preds = {
            f"pred_{kind.replace('-', '_')}": LETTERS[int(np.argmax(s))] for kind, s in by.items()
        }
        row = {"id": q.id, "answer": LETTERS[q.answer]} | preds
        rows.append(row | {"loglik": ll, "tokens": tokens, "chars": chars})
    accuracy = {
        kind: sum(r[f"pred_{kind.replace('-', '_')}"] == r["answer"] for r in rows) / len(rows)
        for kind in SCORES
    }
    return {"questions": len(rows), "accuracy": accuracy}, rows


def cmd_mc(args, rt):
    questions = read_mc(args.data, args.cop_base)  # bad input fails before the model loads
    path = M.model_dir(args.model)
    tok = data.load_tokenizer(path)
    model = load_model(path, rt)
    logliks = option_logliks(model, tok, questions, rt, args.prompt_format, args.batch_size)
    summary, rows = mc_accuracy(questions, logliks)
    accuracy = ", ".join(f"{a:.4f} ({kind})" for kind, a in summary["accuracy"].items())
    rt.say(f"{summary['questions']} questions: accuracy {accuracy}")
    write_out(args, rt, rows)


# ------------------------------------------------------------------ generate (MT-Bench, AlpacaEval)


def read_questions(path) -> tuple:
    """(benchmark, questions): "mt_bench" for MT-Bench's question.jsonl ({"question_id", "category",
    "turns"}), "alpaca_eval" for AlpacaEval's set ({"instruction", ...}, given "turns":
    [instruction]); the first record decides."""
    records = data.read_records(Path(path))
    if not records:
        raise InputError(f"{path}: no questions")
    first = records[0][1]
    benchmark = "alpaca_eval" if isinstance(first, dict) and "instruction" in first else "mt_bench"
    questions, seen = [], set()
    for where, r in records:
        if benchmark == "alpaca_eval":
            if not (isinstance(r, dict) and nonblank(r.get("instruction"))):
                raise InputError(
                    f'{where}: "instruction": expected a non-empty string (AlpacaEval\'s '
                    f"layout, as the first record)"
                )
            questions.append(r | {"turns": [r["instruction"]]})
            continue
        if not isinstance(r, dict) or "question_id" not in r:
            raise InputError(
                f'{where}: "question_id": missing; expected an object with "question_id" '
                f'and "turns"'
            )
        turns = r.get("turns")
        if not (isinstance(turns, list) and turns and all(map(nonblank, turns))):
            raise InputError(f'{where}: "turns": expected a non-empty list of non-empty strings')
        if type(r["question_id"]) not in (str, int):
            got = json.dumps(r["question_id"])[:60]
            raise InputError(f'{where}: "question_id": expected a string or an integer, got {got}')
        if not isinstance(r.get("category", ""), str):
            got = json.dumps(r["category"])[:60]
            raise InputError(f'{where}: "category": expected a string, got {got}')
        if r["question_id"] in seen:
            raise InputError(f'{where}: "question_id": duplicate {json.dumps(r["question_id"])}')
        seen.add(r["question_id"])
        questions.append(r)
    return benchmark, questions


def temperature_of(question, temperature=None) -> float:
    """temperature, or FastChat's for the question's MT-Bench category; 0 (greedy) below 1e-4, as in
    FastChat."""
    if temperature is None:
        temperature = MT_BENCH_TEMPERATURE.get(question.get("category"), DEFAULT_TEMPERATURE)
    return temperature if temperature >= 1e-4 else 0.0


def conversation(turns, answers) -> list:
    """Messages user 1, assistant 1, ..., user k from the questions' turns and the model's k - 1
    answers so far."""
    messages = []
    for user, answer in zip(turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": turns[len(answers)]}]


def answer_questions(model, tok, questions, rt, args) -> list:
    """The model's answers, a list of turn texts per question, on every rank (questions sharded);
    args: generate's flags (prompt_format, max_new_tokens, temperature, top_p, batch_size, seed,
    compile).

    Turn by turn: all first turns, then all second turns with each conversation holding the model's
    own first answer, and so on; each turn in batches of one temperature (temperature_of), sorted by
    prompt length so little is padding. KV-cached; batch j of turn k samples with seed + 1000 k + j,
    so the same flags give the same answers. The end-of-turn token is dropped and the text stripped,
    as FastChat does. Sampling draws from softmax(logits / T) within top_p, with no top-k cut.
    compile: each decoding step torch.compile'd (inductor), one graph for the steps of every batch
    (the batch size and cache length turn dynamic after their first change); eager's tokens.
    """
    stops = data.stop_ids(tok, args.prompt_format)
    # every last turn renders (alpaca's holds one) before any is answered
    for i, q in enumerate(questions):
        last = conversation(q["turns"], [""] * (len(q["turns"]) - 1))
        data.encode_prompt(last, tok, args.prompt_format, f"question {q.get('question_id', i)}")
    temperatures = [temperature_of(q, args.temperature) for q in questions]
    answers = {i: [] for i in data.shard(list(range(len(questions))), rt.rank, rt.world)}
    turns = max(len(q["turns"]) for q in questions)
    # generated tokens, their rate
    progress = tqdm(desc="generate", unit=" tokens", disable=rt.rank != 0)
    for turn in range(turns):
        prompts = {  # a holds the answers to turns 0..turn - 1
            i: data.encode_prompt(conversation(questions[i]["turns"], a), tok, args.prompt_format)
            for i, a in answers.items()
            if turn < len(questions[i]["turns"])
        }
        same_temperature = {}
        for i in sorted(prompts, key=lambda i: len(prompts[i])):
            same_temperature.setdefault(temperatures[i], []).append(i)
        batches = [
            group[k : k + args.batch_size]
            for group in same_temperature.values()
            for k in range(0, len(group), args.batch_size)
        ]
        for j, batch in enumerate(batches):
            progress.set_postfix_str(f"turn {turn + 1}/{turns}, batch {j + 1}/{len(batches)}")
            new = M.generate(
                model,
                [prompts[i] for i in batch],
                args.max_new_tokens,
                temperatures[batch[0]],
                args.top_p,
                eos_ids=stops,
                seed=args.seed + 1000 * turn + j,
                compile="inductor" if args.compile else None,
            )
            for i, ids in zip(batch, new):
                answers[i].append(tok.decode(ids[:-1] if ids and ids[-1] in stops else ids).strip())
            progress.update(sum(map(len, new)))
    progress.close()
    if rt.world > 1:
        parts = [None] * rt.world
        dist.all_gather_object(parts, answers)
        answers = {i: a for part in parts for i, a in part.items()}
    return [answers[i] for i in range(len(questions))]


def answer_records(benchmark, questions, answers, name) -> list:
    """FastChat's model-answer records (MT-Bench), or alpaca_eval's model outputs, name as
    model_id / generator."""
    if benchmark == "alpaca_eval":
        return [
            {"instruction": q["instruction"], "output": a[0], "generator": name}
            | ({"dataset": q["dataset"]} if "dataset" in q else {})
            for q, a in zip(questions, answers)
        ]
    return [
        {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": name}
        | {"choices": [{"index": 0, "turns": a}], "tstamp": time.time()}
        for q, a in zip(questions, answers)
    ]


def cmd_generate(args, rt):
    benchmark, questions = read_questions(args.questions)  # bad input fails before the model loads
    # what FastChat / alpaca_eval read
    suffix = {"mt_bench": ".jsonl", "alpaca_eval": ".json"}[benchmark]
    if Path(args.out).suffix != suffix:
        raise InputError(
            f"--out {args.out}: expected a {suffix} file for {benchmark} (what its judge reads)"
        )
    path = M.model_dir(args.model)
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[benchmark]
    tok = data.load_tokenizer(path)  # refused before the model loads
    answers = answer_questions(load_model(path, rt), tok, questions, rt, args)
    name = args.model_id or Path(args.model).resolve().name
    records = answer_records(benchmark, questions, answers, name)
    write_out(args, rt, records, lines=benchmark == "mt_bench")


# ----------------------------------------------------------------------------- command line


def model_flags(s) -> None:
    """The flags of every command that runs a model: prompt format, batch size, dtype."""
    s.add_argument(
        "--prompt-format", choices=data.PROMPT_FORMATS, help="(default: from the chat template)"
    )
    data.add_number(s, "--batch-size", int, ">= 1", 8, "rows per forward pass")
    s.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the model's weights, compute and KV cache, loaded so (no autocast, no fp32 "
        "copy): auto = bf16 on CUDA, fp32 on CPU",
    )


MODEL_HELP = "HF model directory, or a run directory with final/"
COP_BASE_HELP = (
    "MedMCQA's cop: 1 = its release (1..4), 0 = the HF copy (0..3) (default: decided from "
    "the file: a 0 is 0-based, a 4 is 1-based)"
)


def command(sub, name, run, help) -> argparse.ArgumentParser:
    """A subcommand whose parsed flags carry the function that runs it."""
    s = sub.add_parser(name, formatter_class=data.Help, help=help)
    s.set_defaults(run=run)
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = command(sub, "ppl", cmd_ppl, "response perplexity, overall, per example, per half")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--data", required=True, help="conversations (alpaca / sharegpt / messages)")
    s.add_argument("--split", help="split.json; adds ppl per half")
    text = "tokens per example; longer cut on the right"
    data.add_number(s, "--max-len", int, ">= 2", data.MAX_LEN, text)
    model_flags(s)
    s.add_argument("--out", help="per-example JSONL")

    s = command(sub, "mc", cmd_mc, "multiple-choice accuracy (MedQA, MedMCQA, PubMedQA, ...)")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument(
        "--data",
        required=True,
        help="multiple-choice questions: MedQA, MedMCQA, PubMedQA or our layout",
    )
    s.add_argument("--cop-base", type=int, choices=(0, 1), help=COP_BASE_HELP)
    model_flags(s)
    s.add_argument("--out", help="per-question JSONL")

    s = command(
        sub, "generate", cmd_generate, "MT-Bench or AlpacaEval answers, as judges read them"
    )
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument(
        "--questions",
        required=True,
        help="MT-Bench's question.jsonl, or AlpacaEval's evaluation "
        "set (a JSON array of {instruction, dataset, ...})",
    )
    s.add_argument(
        "--out",
        required=True,
        help="MT-Bench: answers JSONL, e.g. model_answer/NAME.jsonl; "
        "AlpacaEval: model outputs JSON, e.g. NAME/model_outputs.json",
    )
    s.add_argument(
        "--model-id",
        help="model_id (MT-Bench) or generator (AlpacaEval) (default: the model "
        "or run directory's name)",
    )
    number = partial(data.add_number, s)
    text = "per turn (default: 1024 for MT-Bench, as FastChat; 2048 for AlpacaEval)"
    number("--max-new-tokens", int, ">= 1", None, text)
    text = (
        "for every question; below 1e-4 is greedy (default: FastChat's per MT-Bench category, "
        "0.7 for AlpacaEval)"
    )
    number("--temperature", float, ">= 0 and finite", None, text)
    number("--top-p", float, "in (0, 1]", 1.0, "nucleus sampling mass when sampling")
    number("--seed", int, ">= 0", 0, "sampling seed: the same flags give the same answers")
    s.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoding step (inductor, fullgraph): the same answers, "
        "faster on a GPU once compiled",
    )
    model_flags(s)

    return p


def run(p, argv=None) -> None:
    """Parse argv with p and run its command. Numeric flags (data.number) and --out are checked
    before any work; a command that loads a model (it has --dtype) gets devices and process groups,
    a table or picture runs on rank 0 alone; bad input is one line and exit 2 (data.reported)."""
    with data.reported():
        args = p.parse_args(argv)
        if args.out is not None:  # "" is refused, not taken as absent
            flags = ("--data", "--split", "--questions", "--dynamics")
            inputs = {f: getattr(args, f[2:], None) for f in flags}
            data.check_output(args.out, inputs=inputs)
        try:
            if hasattr(args, "dtype"):
                args.run(args, setup(args.dtype))
            elif int(os.environ.get("RANK", 0)) == 0:
                args.run(args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv=None):
    run(parser(), argv)


if __name__ == "__main__":
    main()
