"""Preference losses and their gradients equal TRL's own trainers (trl==1.16.0) on the same model and pairs.

Each test builds one tiny, seeded fp32 Llama (dropout 0), keeps a frozen copy of it as the reference
model, perturbs the policy's weights so that the log-ratios against the reference are not zero, and
computes the loss of the same preference pairs twice:

- TRL: the real trainer is instantiated on an in-memory dataset of prompt/chosen/rejected strings and
  tokenizes it itself; a word-level tokenizer ("t7" is id 7) makes its token ids exactly ours (checked).
  A batch is made by the trainer's own collator from its own tokenized rows and scored by the trainer's
  own `compute_loss`:
  - sigmoid, hinge, ipo: `trl/trainer/dpo_trainer.py` `DPOTrainer` (`DataCollatorForPreference`,
    `_compute_loss` with `loss_type` of the same name, the frozen copy as `ref_model`: its log-probs
    are computed in every step, TRL's default);
  - simpo: `trl/experimental/cpo/cpo_trainer.py` `CPOTrainer` with loss_type="simpo", cpo_alpha=0.0
    (`DPODataCollatorWithPadding`, `concatenated_forward`, `cpo_loss`);
  - orpo: `trl/experimental/orpo/orpo_trainer.py` `ORPOTrainer` (`concatenated_forward`,
    `odds_ratio_loss`).
- ours: `chatkit.data.collate_pairs` (one pair per row, or all pairs packed into one row), the model's
  forward with our block-diagonal mask and per-sequence position_ids (as `chatkit.train.zero`'s
  `_logits`), the reference log-probabilities from the frozen copy by `sequence_logps` (as
  `chatkit.train.reference` computes them once), and `preference_loss`.

Compared: our mean loss (the summed loss over pairs / pairs) with TRL's loss, the gradient of every
parameter, and the logged rewards. Both sides score the same tokens: the reply and its end token, not
the prompt (TRL's completion mask / labels; our template labels), and no sequence's first token.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from chatkit.data import Pair, block_causal_mask, collate_pairs
from chatkit.tokenization import IGNORE_INDEX, Encoded
from chatkit.train.loss import Output
from chatkit.train.preference import PreferenceLoss, pair_count, preference_loss, sequence_logps

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

UNK, EOS, PAD = 0, 1, 2
VOCAB = 48
BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}
SIMPO_GAMMA = 0.5

# (prompt, chosen, rejected) token ids; replies end with EOS. Prompts and replies of different lengths.
PAIRS = [
    ([3, 4, 5], [6, 7, EOS], [8, EOS]),
    ([9, 10], [11, 12, 13, 14, EOS], [15, 16, 17, EOS]),
    ([18, 19, 20, 21], [22, EOS], [23, 24, 25, 26, 27, EOS]),
]
# ORPO: TRL's NLL term (`ORPOTrainer.concatenated_forward`: "orpo chosen nll loss is computed over the
# full prompt and response") is one token mean over every non-padding token of the batch's chosen
# sequences, PROMPT INCLUDED; ours is each pair's mean over its chosen reply only, averaged over pairs.
# So even a batch of one pair differs unless its prompt is a single token (a sequence's first token is
# never a target). They are the same number with one-token prompts and chosen replies of one length, as
# here; rejected replies still differ in length. With longer prompts the two NLL terms differ by design.
ORPO_PAIRS = [
    ([3], [6, 7, 8, EOS], [9, EOS]),
    ([4], [10, 11, 12, EOS], [13, 14, 15, 16, 17, EOS]),
    ([5], [18, 19, 20, EOS], [21, 22, EOS]),
]


def _tokenizer():
    """Word-level: "t<i>" is id i, "<eos>" 1, "<pad>" 2; spaces separate words, special tokens split out."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": UNK, "<eos>": EOS, "<pad>": PAD} | {f"t{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _text(ids: list[int], lead: str) -> str:
    return "".join("<eos>" if i == EOS else f"{lead if k == 0 else ' '}t{i}" for k, i in enumerate(ids))


def _rows(pairs) -> list[dict[str, str]]:
    """TRL's standard (non-conversational) preference rows: prompt, and replies that continue it."""
    return [{"prompt": _text(p, ""), "chosen": _text(c, " "), "rejected": _text(r, " ")} for p, c, r in pairs]


def _models(seed: int = 0):
    """(policy, frozen reference): a tiny fp32 Llama, and the policy moved off it by seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
        initializer_range=0.2, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    ref = LlamaForCausalLM(cfg).float().eval()
    policy = copy.deepcopy(ref).train()  # as in training (its dropout is 0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref.requires_grad_(False)
    return policy, ref


def _common_args(tmp_path, n: int) -> dict:
    return dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, fp16=False, report_to=[], seed=0, max_length=64,
        per_device_train_batch_size=n, disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None,
    )  # fmt: skip


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _trl_dpo(kind, policy, ref, pairs, tmp_path):
    """`DPOTrainer._compute_loss` on a batch from its own `DataCollatorForPreference`."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(tmp_path, len(pairs)), loss_type=[kind], beta=BETA[kind])
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, processing_class=_tokenizer(),
        train_dataset=datasets.Dataset.from_list(_rows(pairs)),
    )  # fmt: skip
    data = trainer.train_dataset
    for i, (p, c, r) in enumerate(pairs):  # TRL's own tokenization gives our ids
        assert (data[i]["prompt_ids"], data[i]["chosen_ids"], data[i]["rejected_ids"]) == (p, c, r)
    batch = trainer.data_collator([data[i] for i in range(len(pairs))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    rewards = (m["rewards/chosen"][-1], m["rewards/rejected"][-1], m["rewards/accuracies"][-1])
    return loss.detach(), _grads(policy), rewards


def _trl_cpo_orpo(kind, policy, pairs, tmp_path):
    """`CPOTrainer` (simpo, cpo_alpha=0) or `ORPOTrainer` `compute_loss` on a batch from their own
    `DPODataCollatorWithPadding` over their own `tokenize_row` output."""
    if kind == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        extra = dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=SIMPO_GAMMA)
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        extra = {}
    args = Config(**_common_args(tmp_path, len(pairs)), beta=BETA[kind], **extra)
    trainer = Trainer(
        model=policy, args=args, processing_class=_tokenizer(),
        train_dataset=datasets.Dataset.from_list(_rows(pairs)),
    )  # fmt: skip
    data = trainer.train_dataset
    for i, (p, c, r) in enumerate(pairs):  # TRL's own tokenization gives our ids and labels
        assert data[i]["prompt_input_ids"] == p
        assert data[i]["chosen_input_ids"] == p + c and data[i]["rejected_input_ids"] == p + r
        assert data[i]["chosen_labels"] == [IGNORE_INDEX] * len(p) + c
        assert data[i]["rejected_labels"] == [IGNORE_INDEX] * len(p) + r
    batch = trainer.data_collator([data[i] for i in range(len(pairs))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = trainer._stored_metrics["train"]
    rewards = (m["rewards/chosen"][-1], m["rewards/rejected"][-1], m["rewards/accuracies"][-1])
    return loss.detach(), _grads(policy), rewards


def _logits(model, batch):
    """As `chatkit.train.zero` calls the model: block-diagonal causal mask, positions per sequence."""
    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    ).logits
    return Output(logits=logits)


def _ours(loss: PreferenceLoss, policy, ref, pairs, packed: bool):
    encoded = [
        Pair(Encoded(p + c, [IGNORE_INDEX] * len(p) + c), Encoded(p + r, [IGNORE_INDEX] * len(p) + r))
        for p, c, r in pairs
    ]

    def rows(items):
        return [items] if packed else [[x] for x in items]

    if loss.needs_reference:  # the frozen copy's log-probs, once, as chatkit.train.reference computes them
        b = collate_pairs(rows(encoded), PAD)
        with torch.no_grad():
            ref_logps = sequence_logps(_logits(ref, b), b)[0].double().view(-1, 2)
        encoded = [
            e._replace(ref_chosen=float(a), ref_rejected=float(z))
            for e, (a, z) in zip(encoded, ref_logps, strict=True)
        ]
    batch = collate_pairs(rows(encoded), PAD)
    assert batch["input_ids"].shape[0] == (1 if packed else len(pairs))
    total, stats = preference_loss(loss, _logits(policy, batch), batch)
    n = pair_count(batch)
    (total / n).backward()
    return (total / n).detach(), _grads(policy), tuple(float(s) / n for s in (stats[2], stats[3], stats[0]))


@pytest.mark.parametrize("packed", [False, True], ids=["row_per_pair", "packed"])
@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_loss_and_gradients_equal_trl(kind, packed, tmp_path, caplog):
    """Our loss, every parameter's gradient and the logged rewards equal TRL's trainer on the same pairs.

    sigmoid/ipo/hinge: `trl/trainer/dpo_trainer.py` `DPOTrainer._compute_loss`; simpo:
    `trl/experimental/cpo/cpo_trainer.py` `CPOTrainer.cpo_loss` (loss_type="simpo", cpo_alpha=0);
    orpo: `trl/experimental/orpo/orpo_trainer.py` `ORPOTrainer.odds_ratio_loss` plus its chosen NLL
    (one-token prompts and equal chosen lengths: see ORPO_PAIRS). `packed`: all pairs in one row of ours.
    """
    caplog.set_level(logging.ERROR)
    pairs = ORPO_PAIRS if kind == "orpo" else PAIRS
    policy, ref = _models()
    if kind in ("simpo", "orpo"):
        trl_loss, trl_grads, trl_rewards = _trl_cpo_orpo(kind, policy, pairs, tmp_path)
    else:
        trl_loss, trl_grads, trl_rewards = _trl_dpo(kind, policy, copy.deepcopy(ref), pairs, tmp_path)
    loss = PreferenceLoss(kind, BETA[kind], SIMPO_GAMMA)
    our_loss, our_grads, our_rewards = _ours(loss, policy, ref, pairs, packed)

    assert trl_loss.item() > 1e-3  # a real loss, not a degenerate zero
    torch.testing.assert_close(our_loss.float(), trl_loss.float(), rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) == len(list(policy.parameters()))
    scale = max(g.abs().max().item() for g in trl_grads.values())
    assert scale > 1e-4  # the gradients are not all zero (hinge: inside its margin)
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # rewards (beta x log-ratio, or beta x mean log-prob without a reference) and reward accuracy
    assert our_rewards == pytest.approx(trl_rewards, rel=1e-5, abs=1e-6)
    if loss.needs_reference:  # the policy really differs from the reference
        assert abs(our_rewards[0]) > 1e-3 and abs(our_rewards[1]) > 1e-3
