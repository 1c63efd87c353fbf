"""The conformance kit's worked example on TRL: SFTMix on SFTTrainer, as a TRL user writes it.

    python scripts/conformance.py make --out KIT/
    python scripts/conformance_trl.py KIT/ --out theirs.json
    python scripts/conformance.py check KIT/ theirs.json

SFTMixTrainer is TRL's SFTTrainer with three changes: a paired sampler (a global batch holds P
confident examples, then their P unconfident partners), the Mixup term added to TRL's loss in
compute_loss, from the final-norm hidden states (HF's hidden_states[-1]) and the LM head, and the
learning-rate schedule (TRL's cosine warms up from lr 0). The conversations go in as chat messages,
with assistant_only_loss=True and a chat template that marks what is trained with {% generation %}.
The rest is the kit's: its pairs, lambdas and settings in, and what each stage asks back out (the
gradient entries read as the backward leaves them, before TRL clips them). Nothing of this project
is imported but the other worked example's mixup_loss (conformance_transformers.py: transformers and
torch only) and kit_example.py, the command line both share (standard library only).
"""
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

import kit_example  # the command line: KIT --out FILE
from conformance_transformers import mixup_loss  # L_Mixup over (G, T) rows, pre-shifted labels

# SmolLM2's chat template with {% generation %} around what is trained: each assistant turn's
# content and its <|im_end|>, not the newline after it (TRL patches a few families' templates
# itself; not SmolLM2's)
TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class SFTMixTrainer(SFTTrainer):
    """SFTTrainer with SFTMix's loss, L = L_NTP + mu L_Mixup.

    batches: per optimizer step, the dataset indices of P confident examples, then of their P
    unconfident partners (per_device_train_batch_size = 2P; pair i = rows i and P + i); lambdas:
    per step, the P lambdas (SFTMix draws them from Beta(alpha, alpha)). Without lambdas it trains
    plain NTP on the batches.
    """

    def __init__(self, *args, batches, lambdas=None, mu=0.2, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.lambdas, self.mu = batches, lambdas, mu

    def _get_train_sampler(self, train_dataset=None):
        return [i for batch in self.batches for i in batch]  # the paired sampler

    def create_scheduler(self, num_training_steps, optimizer=None):
        """W = ceil(warm-up ratio * steps) warm-up steps, step k at lr (k + 1) / W (TRL's: k / W),
        then cosine to 0."""
        W = self.args.get_warmup_steps(num_training_steps)

        def factor(k):
            if k < W:
                return (k + 1) / W
            return 0.5 * (1 + math.cos(math.pi * (k - W) / max(1, num_training_steps - W)))
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.lambdas is None or not model.training:  # NTP, and the evaluation loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = []  # the final norm's output, HF's hidden_states[-1]: TRL's fused head skips it
        final_norm = self.model.get_decoder().norm
        with final_norm.register_forward_hook(lambda module, args, out: hidden.append(out)):
            ntp = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        lam = torch.tensor(self.lambdas[self.state.global_step], device=ntp.device)
        # TRL's labels are unshifted (-100 where not trained): the state at t predicts the token at t + 1
        mix = mixup_loss(hidden[0][:, :-1], inputs["labels"][:, 1:], lam,
                         self.model.get_output_embeddings())
        self._metrics["train"]["ntp_loss"].append(ntp.item())
        self._metrics["train"]["mixup_loss"].append(mix.item())
        return ntp + self.mu * mix


# ----------------------------------------------------------------------------- the kit's runs

class KitTrainer(SFTMixTrainer):
    """SFTMixTrainer that reads the kit's gradient entries as the backward leaves them, before TRL
    clips the gradient."""

    def __init__(self, *args, grad_entries=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_entries, self.grads = grad_entries, []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.grads.append([self.model.get_parameter(name).grad[tuple(index)].item()
                           for name, index in self.grad_entries])
        return loss


class Perplexities(TrainerCallback):
    """Every example's response perplexity after every step: the training dynamics of stage 3."""

    def __init__(self, examples):
        self.examples, self.values = examples, {i: [] for i in examples}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for i, (x, y) in self.examples.items():
            nll, n = response_nll(model, x, y)
            self.values[i].append(math.exp(nll / n))


@torch.no_grad()
def response_nll(model, input_ids, labels):
    """(summed NLL of the trained tokens, their number) of one example, labels as TRL makes them."""
    logits = model(input_ids=torch.tensor([input_ids], device=model.device)).logits[0, :-1]
    y = torch.tensor(labels[1:], device=model.device)  # (T - 1,)
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item(), \
        int((y != -100).sum())


def kit_trainer(kit, dataset, settings, batches, warmup_ratio, **kwargs):
    """A KitTrainer for one of the kit's runs on batches (indices into dataset), data tokenized."""
    tok = AutoTokenizer.from_pretrained(kit / "model")
    tok.chat_template = TRAINING_TEMPLATE
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), assistant_only_loss=True, max_length=settings["max_len"] + 1,
        per_device_train_batch_size=len(batches[0]), num_train_epochs=1,
        learning_rate=settings["lr"], warmup_steps=warmup_ratio,
        weight_decay=settings["weight_decay"], adam_beta1=settings["betas"][0],
        adam_beta2=settings["betas"][1], adam_epsilon=settings["eps"],
        max_grad_norm=settings["grad_clip"], activation_checkpointing=False, bf16=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    return KitTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                      batches=batches, **kwargs)


def compute(kit):
    """THEIRS.json's content for every stage."""
    kit = Path(kit)
    expected = json.loads((kit / "expected.json").read_text("utf-8"))
    settings, ref = expected["settings"], expected["inputs"]["reference_run"]
    sft = expected["inputs"]["sftmix_run"]
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(kit / "model")
    for c in conversations:  # the training template renders as the kit's own
        assert tok.apply_chat_template(c["messages"], tokenize=False) == tok.apply_chat_template(
            c["messages"], tokenize=False, chat_template=TRAINING_TEMPLATE), "not SmolLM2's"
    dataset = Dataset.from_list(conversations)
    index = {c["id"]: k for k, c in enumerate(conversations)}

    trainer = kit_trainer(kit, dataset, settings, [[index[i] for i in b] for b in ref["batches"]],
                          ref["warmup_ratio"])  # the reference run: NTP
    examples = {c["id"]: (row["input_ids"], row["labels"])
                for c, row in zip(conversations, trainer.train_dataset)}  # as TRL tokenized them
    base = AutoModelForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    nll = {i: response_nll(base, *x) for i, x in examples.items()}
    perplexities = Perplexities(examples)
    trainer.add_callback(perplexities)
    trainer.train()
    confidence = {i: -statistics.fmean(p) for i, p in perplexities.values.items()}
    ranked = sorted(examples, key=lambda i: (-confidence[i], i))

    batches = [[index[c] for c, _ in pairs] + [index[u] for _, u in pairs]
               for pairs in sft["pairs"]]
    trainer = kit_trainer(kit, dataset, settings, batches, sft["warmup_ratio"],
                          lambdas=sft["lambda"], mu=settings["mu"],
                          grad_entries=sft["grad_entries"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]  # one per step
    return {"input_ids": {i: x[:-1] for i, (x, _) in examples.items()},
            "labels": {i: y[1:] for i, (_, y) in examples.items()},
            "response_nll": {i: v for i, (v, _) in nll.items()},
            "n_tokens": {i: n for i, (_, n) in nll.items()},
            "perplexities": perplexities.values, "confidence": confidence,
            "variability": {i: statistics.pstdev(p) for i, p in perplexities.values.items()},
            "split": {"confident": ranked[:len(ranked) // 2],
                      "unconfident": ranked[len(ranked) // 2:]},
            "sftmix_steps": [{"lr": h["learning_rate"], "ntp_loss": h["ntp_loss"],
                              "mixup_loss": h["mixup_loss"], "loss": h["loss"],
                              "grad_norm": h["grad_norm"], "grad_entries": g}
                             for h, g in zip(logs, trainer.grads)],
            "weight_norms": {name: p.norm().item() for name, p in trainer.model.named_parameters()}}


if __name__ == "__main__":
    kit_example.main(compute, __doc__.split("\n\n")[0])
