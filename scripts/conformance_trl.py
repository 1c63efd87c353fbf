"""The conformance kit's worked example on TRL: SFTMix on SFTTrainer, as a TRL user writes it.

    python scripts/conformance.py make --out KIT/
    python scripts/conformance_trl.py KIT/ --out theirs.json
    python scripts/conformance.py check KIT/ theirs.json

    torchrun --nproc_per_node 2 scripts/conformance_trl.py KIT/ --out theirs.json  # 2 ranks

SFTMixTrainer is TRL's SFTTrainer with these changes: a paired sampler (a global batch holds P
confident examples, then their P unconfident partners, cut into micro-batches of whole pairs over
the accumulation steps and ranks), the Mixup term added to TRL's loss in compute_loss, from the
final-norm hidden states (HF's hidden_states[-1]) and the LM head, normalised as TRL's NTP term over
the global batch (its mixed positions counted in get_batch_samples, where Trainer counts the trained
tokens), both terms logged once a step, and the schedule (transformers' cosine warms up from lr 0).
It refuses packing and padding_free, and any lr_scheduler_type but cosine. The conversations go in
as chat messages, with assistant_only_loss=True and a chat template that marks what is trained with
{% generation %}. The rest is the kit's: its pairs, lambdas and settings in, and what each stage
asks back out (the gradient entries read before TRL clips the gradient); stage 7 runs the SFTMix
run again in micro-batches of --micro-batch rows, accumulated over 8 / (rows x ranks) steps.
Nothing of this project is imported but the other worked example's mixup_loss
(conformance_transformers.py: transformers and torch only) and kit_example.py, the command line
both share (standard library only).
"""

import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import kit_example  # the command line: KIT --out FILE
import torch
import torch.nn.functional as F
from conformance_transformers import mixup_loss  # L_Mixup over (G, T) rows, pre-shifted labels
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

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
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class SFTMixTrainer(SFTTrainer):
    """SFTTrainer with SFTMix's loss, L = L_NTP + mu L_Mixup, each term over the global batch.

    batches: per optimizer step, the example ids (the dataset's "id" column) of P confident
    examples, then of their P unconfident partners; lambdas: per step, the P lambdas of its pairs
    (SFTMix draws them from Beta(alpha, alpha)). Without lambdas it trains plain NTP on the batches.
    A global batch of 2P rows is cut into micro-batches of per_device_train_batch_size = 2h rows
    (h whole pairs), gradient_accumulation_steps on each of world_size ranks.
    """

    def __init__(self, model, args, *, batches, lambdas=None, mu=0.2, **kwargs):
        per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        if args.packing or args.padding_free:
            raise ValueError(
                "SFTMixTrainer: packing and padding_free take a pair's examples out "
                "of their rows; set both to False"
            )
        if args.lr_scheduler_type.value != "cosine":
            raise ValueError(
                f"SFTMixTrainer: lr_scheduler_type {args.lr_scheduler_type.value}: "
                f"expected cosine (create_scheduler's warm-up from lr / W, then "
                f"cosine)"
            )
        if per_step != len(batches[0]) or (lambdas and args.per_device_train_batch_size % 2):
            raise ValueError(
                f"SFTMixTrainer: per_device_train_batch_size x gradient_accumulation_"
                f"steps x world_size = {per_step}: expected the {len(batches[0])} "
                f"rows of a global batch, in micro-batches of whole pairs"
            )
        super().__init__(model, args, **kwargs)
        self.batches, self.lambdas, self.mu = batches, lambdas, mu
        self._micro, self._terms, self._logged = 0, 0, 0  # micro-batches; (L_NTP, L_Mixup) sums

    def _get_train_sampler(self, train_dataset=None):
        """The paired sampler. Accelerate hands the sampler's micro-batch c to rank c mod world,
        so micro-batch q = a world + rank of a step (a: its accumulation step) holds the step's
        pairs [q h, (q + 1) h), h = per_device_train_batch_size / 2: confident examples first."""
        h, order = self.args.per_device_train_batch_size // 2, []
        for batch in self.batches:
            P = len(batch) // 2
            order += (
                [i for q in range(0, P, h) for i in batch[q : q + h] + batch[P + q : P + q + h]]
                if self.lambdas
                else batch
            )
        at = {i: k for k, i in enumerate(self.train_dataset["id"])}  # TRL drops, may shuffle
        if missing := sorted(set(order) - set(at)):
            raise ValueError(
                f"SFTMixTrainer: examples {missing[:3]} are not in the training set "
                f"(TRL drops those that truncation leaves untrained)"
            )
        return [at[i] for i in order]

    def create_scheduler(self, num_training_steps, optimizer=None):
        """W = ceil(warm-up ratio * steps) warm-up steps, step k at lr (k + 1) / W (transformers'
        cosine schedule: k / W, a first step at lr 0), then cosine to 0."""
        W = self.args.get_warmup_steps(num_training_steps)

        def factor(k):
            if k < W:
                return (k + 1) / W
            return 0.5 * (1 + math.cos(math.pi * (k - W) / max(1, num_training_steps - W)))

        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer counts the trained tokens of the step's micro-batches on every rank (L_NTP's
        denominator); the mixed positions, L_Mixup's, are counted here alike: min(n^c, n^u) a
        pair."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.lambdas:
            n = [(b["labels"][:, 1:] != -100).sum(1) for b in batches]  # (2h,) per micro-batch
            n = sum(torch.minimum(*m.view(2, -1)).sum() for m in n).to(device)
            if self.args.average_tokens_across_devices:  # as num_items_in_batch
                n = self.accelerator.reduce(n, "sum")
            self.n_mixed = n.clamp(min=1)
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.lambdas is None or not model.training:  # NTP, and the evaluation loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = []  # the final norm's output, HF's hidden_states[-1]: TRL's fused head skips it
        final_norm = self.model.get_decoder().norm
        with final_norm.register_forward_hook(lambda module, args, out: hidden.append(out)):
            ntp = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        # TRL's NTP term: this micro-batch's summed NLL / the global batch's trained tokens, times
        # the ranks (DDP averages gradients over them); Trainer does not divide by the accumulation
        # steps. L_Mixup alike, over the global batch's mixed positions
        a = self.args
        world = a.world_size if a.average_tokens_across_devices else 1
        h, step = len(inputs["labels"]) // 2, self.lambdas[self.state.global_step]
        q = (self._micro % a.gradient_accumulation_steps) * a.world_size + a.process_index
        lam = torch.tensor(step[q * h : (q + 1) * h], device=ntp.device)  # (h,) this micro-batch's
        # TRL's labels are unshifted (-100 where not trained): the state at t predicts token t + 1
        mix = (
            mixup_loss(
                hidden[0][:, :-1],
                inputs["labels"][:, 1:],
                lam,
                self.model.get_output_embeddings(),
                "sum",
            )
            / self.n_mixed
            * world
        )
        self._micro += 1
        # summed over micro-batches and ranks: the global batch's terms (no host sync)
        self._terms = self._terms + torch.stack([ntp, mix]).detach() / a.world_size
        return ntp + self.mu * mix

    def log(self, logs, start_time=None):
        """A training log gains L_NTP and L_Mixup of the global batch, over the steps since the
        last one (summed over micro-batches and ranks: one device read a log, as Trainer's loss)."""
        if "loss" in logs and self._micro > self._logged:
            steps = (self._micro - self._logged) / self.args.gradient_accumulation_steps
            ntp, mix = (self.accelerator.reduce(self._terms, "sum") / steps).tolist()
            logs.update(ntp_loss=ntp, mixup_loss=mix)
            self._terms, self._logged = 0, self._micro
        super().log(logs, start_time)


# ----------------------------------------------------------------------------- the kit's runs


class KitTrainer(SFTMixTrainer):
    """SFTMixTrainer that reads the kit's gradient entries of every step just before TRL clips the
    gradient (after the last micro-batch's backward and DDP's all-reduce)."""

    def __init__(self, model, args, *, grad_entries=(), **kwargs):
        super().__init__(model, args, **kwargs)
        self.grad_entries, self.grads = grad_entries, []

    def _clip_grad_norm(self, model):
        self.grads.append(
            [
                self.model.get_parameter(name).grad[tuple(index)].item()
                for name, index in self.grad_entries
            ]
        )
        return super()._clip_grad_norm(model)


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
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item(), int(
        (y != -100).sum()
    )


def kit_trainer(
    kit, settings, batches, warmup_ratio, micro_batch, trainer_class=KitTrainer, **kwargs
):
    """A KitTrainer for one of the kit's runs on batches (example ids), its data.jsonl tokenized,
    each global batch in micro-batches of micro_batch rows over this run's ranks (torchrun's)."""
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(kit / "model")
    for c in conversations:  # the training template renders as the kit's own
        assert tok.apply_chat_template(c["messages"], tokenize=False) == tok.apply_chat_template(
            c["messages"], tokenize=False, chat_template=TRAINING_TEMPLATE
        ), "not SmolLM2's"
    tok.chat_template = TRAINING_TEMPLATE
    world = int(os.environ.get("WORLD_SIZE", 1))
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        assistant_only_loss=True,
        max_length=settings["max_len"] + 1,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=len(batches[0]) // (micro_batch * world),
        num_train_epochs=1,
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio,
        weight_decay=settings["weight_decay"],
        adam_beta1=settings["betas"][0],
        adam_beta2=settings["betas"][1],
        adam_epsilon=settings["eps"],
        max_grad_norm=settings["grad_clip"],
        activation_checkpointing=False,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    return trainer_class(
        model,
        config,
        train_dataset=Dataset.from_list(conversations),
        processing_class=tok,
        batches=batches,
        **kwargs,
    )


def sftmix_run(kit, micro_batch, trainer_class=KitTrainer):
    """The kit's SFTMix run in micro-batches of micro_batch rows on this run's ranks: (its steps
    as stages 4 and 5 ask them, the trainer)."""
    kit = Path(kit)
    expected = json.loads((kit / "expected.json").read_text("utf-8"))
    sft = expected["inputs"]["sftmix_run"]
    batches = [[c for c, _ in pairs] + [u for _, u in pairs] for pairs in sft["pairs"]]
    trainer = kit_trainer(
        kit,
        expected["settings"],
        batches,
        sft["warmup_ratio"],
        micro_batch,
        trainer_class,
        lambdas=sft["lambda"],
        mu=expected["settings"]["mu"],
        grad_entries=sft["grad_entries"],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]  # one per step
    return [
        {
            "lr": h["learning_rate"],
            "ntp_loss": h["ntp_loss"],
            "mixup_loss": h["mixup_loss"],
            "loss": h["loss"],
            "grad_norm": h["grad_norm"],
            "grad_entries": g,
        }
        for h, g in zip(logs, trainer.grads)
    ], trainer


def compute(kit, micro_batch=2):
    """THEIRS.json's content for every stage; stage 7's run in micro-batches of micro_batch rows."""
    kit = Path(kit)
    expected = json.loads((kit / "expected.json").read_text("utf-8"))
    ref = expected["inputs"]["reference_run"]
    whole = len(ref["batches"][0]) // int(os.environ.get("WORLD_SIZE", 1))  # a batch a rank
    trainer = kit_trainer(kit, expected["settings"], ref["batches"], ref["warmup_ratio"], whole)
    examples = {
        row["id"]: (row["input_ids"], row["labels"])  # as TRL tokenized them
        for row in trainer.train_dataset
    }
    base = AutoModelForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    nll = {i: response_nll(base, *x) for i, x in examples.items()}
    perplexities = Perplexities(examples)
    trainer.add_callback(perplexities)
    trainer.train()  # the reference run: NTP
    confidence = {i: -statistics.fmean(p) for i, p in perplexities.values.items()}
    ranked = sorted(examples, key=lambda i: (-confidence[i], i))
    steps, trainer = sftmix_run(kit, whole)
    return {
        "input_ids": {i: x[:-1] for i, (x, _) in examples.items()},
        "labels": {i: y[1:] for i, (_, y) in examples.items()},
        "response_nll": {i: v for i, (v, _) in nll.items()},
        "n_tokens": {i: n for i, (_, n) in nll.items()},
        "perplexities": perplexities.values,
        "confidence": confidence,
        "variability": {i: statistics.pstdev(p) for i, p in perplexities.values.items()},
        "split": {
            "confident": ranked[: len(ranked) // 2],
            "unconfident": ranked[len(ranked) // 2 :],
        },
        "sftmix_steps": steps,
        "weight_norms": {name: p.norm().item() for name, p in trainer.model.named_parameters()},
        "sftmix_steps_micro": sftmix_run(kit, micro_batch)[0],
    }


if __name__ == "__main__":
    kit_example.main(compute, __doc__.split("\n\n")[0], micro_batch=2)
