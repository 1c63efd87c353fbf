"""How much memory a train.py step takes per GPU, estimated before anything loads (train.py refuses
a run that would not fit; scripts/memory_table.py prints the table for the paper's models)."""

from sftmix import CHUNK


def memory_per_gpu(
    m, gpus, shard, activation_checkpointing, tokens_per_gpu, mixup=True, chunk=CHUNK
):
    """Estimated peak bytes per GPU of one train.py step (bf16 compute, fp32 weights, AdamW), by
    term; SFTMix's step, or NTP's with mixup=False.

    ModelArgs m (no biases); P parameters, P_b in one block, E = V D in the embedding (and in an
    untied LM head); N = gpus under FSDP2, 1 under DDP; T tokens per micro-batch, one packed row of
    sequences of equal length (attention sees them right-padded to the longest: unequal lengths add
    padding to its terms below); n = min(T, chunk) positions per LM-head chunk (sftmix.CHUNK).
    Resident:
        weights    4P/N   fp32 (FSDP2: this rank's shards)
        optimizer  8P/N   AdamW's two fp32 moments
        grads      4P/N   fp32. FSDP2 reduce-scatters each unit after every micro-batch: no unsharded gradient
                          stays between micro-batches; the shards fill up during backward (at its
                          start only the LM head's exist). DDP's buckets hold all of them all the
                          time.
        load       4P/N   model.load_pretrained: the shards; the one full tensor read at a time stays on the host
    Working set:
        activations  kept for backward, per token and block (bf16, fp32 where the code computes in fp32):
                         a = 2 (8D + 4)         two RMSNorms: fp32 input and 1/rms, bf16 normalised input
                                                (the weight's gradient needs it) and output
                           + 2 (3 H hd + 2 K hd)   q, k and v as padded sequences (K heads: SDPA's GQA), the
                           + 4 H                   output, and in the row's order the output projection's input;
                                                   fp32 logsumexp
                           + 4 (2 I)               gate, up, silu(gate), silu(gate) * up
                     and 8D + 4 per token for the final norm and the hidden states the head reads. With
                     --activation-checkpointing: each block's bf16 input (2D per token and block), plus one
                     block recomputed in backward, a per token.
        head         the backward of one chunk: its fp32 log-probabilities (kept), their gradient and the
                     logits' gradient, 12 n V; SFTMix's chunk of pairs holds one more (n, V) fp32
                     tensor, the mixed logits' gradient returned to the two halves of the logits, 16
                     n V. And the LM head's weight gradient in bf16, 2E (DDP: and its fp32 cast, 4E
                     more). No (T, V) logits exist.
        buffers      FSDP2's, per unit (each block; the embedding; final norm + LM head together, as torchtitan;
                     a tied model keeps embedding = LM head and final norm in the root unit): the
                     bf16 weights gathered, the unit's bf16 gradient and its fp32 reduce-scatter
                     input; the input of the previous unit's reduce-scatter stays until this unit's
                     begins. DDP: autocast's bf16 copy of every weight, kept for backward, 2P, and
                     the embedding's fp32 gradient before it joins its bucket, 4E.
    The peak is the largest of the step's fullest moments (FSDP2's terms; under DDP every gradient
    exists throughout) and loading:
        head      the LM head's backward: every activation kept, the head's working set; gathered, the head's
                  unit (kept from its forward) and block L-1 (prefetched); no gradient made yet.
        top       block L-1's backward, the first: every activation kept (with checkpointing: every block's
                  input, and this block recomputed); the head's gradients made; this block and the
                  next gathered; its bf16 gradient; the head's reduce-scatter input in flight.
        bottom    block 0's backward, the last: its activations alone; every gradient made but its own and the
                  last unit's; it gathered, its bf16 gradient, block 1's reduce-scatter input in
                  flight.
        last unit the embedding's backward (the tied root's): every other gradient made; the unit
        gathered
                  (size U), its bf16 gradient and block 0's reduce-scatter input, then that
                  gradient, a bf16 staging copy of it and its fp32 reduce-scatter input: 4U + 4
                  max(P_b, U).
    The tied root is gathered all step, and its bf16 gradient kept from the head's backward to the
    end.
    """
    D, I, L, H, hd, V = (
        m.hidden_size,
        m.intermediate_size,
        m.num_hidden_layers,
        m.num_attention_heads,
        m.head_dim,
        m.vocab_size,
    )
    fsdp, tied, T, n = (
        shard == "fsdp",
        m.tie_word_embeddings,
        tokens_per_gpu,
        min(tokens_per_gpu, chunk),
    )
    K = m.num_key_value_heads
    P_b = D * (H + 2 * K) * hd + H * hd * D + 3 * D * I + 2 * D  # attention, MLP, two norms
    E = V * D
    P = L * P_b + E * (1 if tied else 2) + D
    N = gpus if fsdp else 1
    a = 2 * (8 * D + 4) + 2 * (3 * H * hd + 2 * K * hd) + 4 * H + 4 * 2 * I  # per token and block
    final = (8 * D + 4) * T
    if activation_checkpointing:  # every block's input kept, one block recomputed
        kept = {"top": 2 * D * L * T + a * T, "bottom": 2 * D * T + a * T}
        kept["head"] = 2 * D * L * T + final
    else:
        kept = {"head": L * a * T + final, "top": L * a * T, "bottom": a * T}
    head = (16 if mixup else 12) * n * V + (2 if fsdp else 6) * E
    weights, optimizer, grads = 4 * P / N, 8 * P / N, 4 * P / N
    head_unit = E + D  # final norm + LM head; tied: the root's embedding = LM head and final norm
    U = head_unit if tied else E  # the unit reduced last
    if fsdp:
        root = (
            2 * head_unit + 2 * E if tied else 0
        )  # the tied root gathered all step, and its gradient
        made = {
            "head": 0,
            "top": 0 if tied else 4 * head_unit / N,
            "bottom": 4 * (P - P_b - U) / N,
            "last unit": 4 * (P - U) / N,
        }
        buffers = {
            "head": 2 * head_unit + 2 * P_b,
            "top": root + 4 * P_b + 2 * P_b + (0 if tied else 4 * head_unit),
            "bottom": root + 2 * P_b + 2 * P_b + 4 * P_b,
            "last unit": 4 * U + 4 * max(P_b, U),
        }
    else:
        made = dict.fromkeys(("head", "top", "bottom", "last unit"), grads)
        buffers = {"head": 2 * P, "top": 2 * P, "bottom": 2 * P, "last unit": 4 * E}
    working = {
        "head": kept["head"] + head,
        "top": kept["top"],
        "bottom": kept["bottom"],
        "last unit": 0,
    }
    phases = {k: weights + optimizer + made[k] + working[k] + buffers[k] for k in made}
    phases["load"] = 4 * P / N
    at = max(phases, key=phases.get)
    return {
        "parameters": P,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "load": phases["load"],
        "activations": max(kept.values()),
        "head": head,
        "buffers": max(buffers.values()),
        "phases": phases,
        "at": at,
        "total": phases[at],
    }
