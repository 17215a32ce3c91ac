"""DPO: the loss and its hand-written backward against autograd in float64 (the loss alone, and through the
whole model with masked prompts and ragged lengths), the preference data, and the reference cache."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rgpt.data import CorpusError
from rgpt.data.preference import PairBatcher, PairSet, collate_pairs, parse_pair, prepare_pairs, read_pairs
from rgpt.data.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, USER_ID, Tokenizer
from rgpt.nn.dpo import DPOLoss
from rgpt.stages.dpo import reference_logprobs, score_pairs
from tests.helpers import assert_close
from tests.nn.test_model import make_model
from tests.reference import reference_from

DT = torch.float64
PAIRS = Path(__file__).resolve().parents[1] / "files" / "dpo_pairs.jsonl"


def reference_dpo_loss(logp, ref_logp, beta):
    """The paper's loss, written the ordinary way: -log σ(β[(π_w - ref_w) - (π_l - ref_l)]), mean over pairs."""
    B = logp.shape[0] // 2
    z = beta * ((logp[:B] - ref_logp[:B]) - (logp[B:] - ref_logp[B:]))
    return -F.logsigmoid(z).mean()


def test_dpo_loss_and_its_gradient_match_autograd():
    B, beta = 5, 0.3
    logp = -torch.rand(2 * B, dtype=DT) * 40  # summed log-probabilities of 2B replies
    ref_logp = logp + torch.randn(2 * B, dtype=DT) * 5  # margins of both signs, some large
    ref_logp[0] = logp[0] - 200.0  # a saturated pair: σ(-z) underflows towards 0 without NaN
    crit = DPOLoss(beta)
    loss = crit.forward(logp, ref_logp)
    dlogp = crit.backward(scale=0.7)
    with torch.enable_grad():
        leaf = logp.clone().requires_grad_(True)
        want = reference_dpo_loss(leaf, ref_logp, beta)
        (want * 0.7).backward()
    assert_close(loss, want.detach(), "DPO loss")
    assert_close(dlogp, leaf.grad, "dL/dlogp")
    assert torch.isfinite(dlogp).all()


def test_dpo_loss_is_ln2_when_the_policy_is_the_reference():
    logp = -torch.rand(8, dtype=DT) * 30
    crit = DPOLoss(0.1)
    assert crit.forward(logp, logp.clone()).item() == pytest.approx(math.log(2), abs=1e-15)
    dlogp = crit.backward()
    assert_close(dlogp, torch.tensor([-0.1 * 0.5 / 4] * 4 + [0.1 * 0.5 / 4] * 4, dtype=DT), "dlogp at z = 0")


def ragged_pair_batch(V=23, B=3):
    """B pairs of different prompt and reply lengths, as collate_pairs builds them (padding, masked prompts)."""
    g = torch.Generator().manual_seed(7)
    chosen, rejected = [], []
    for i in range(B):
        prompt = torch.randint(6, V, (3 + 2 * i,), generator=g).tolist()
        for out, n in ((chosen, 2 + i), (rejected, 5 - i)):
            ids = torch.tensor(
                [
                    BOS_ID,
                    USER_ID,
                    *prompt,
                    ASSISTANT_ID,
                    *torch.randint(6, V, (n,), generator=g).tolist(),
                    EOS_ID,
                ]
            )
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt) + 3 :] = True
            out.append((ids, mask))
    return collate_pairs(PairSet(chosen, rejected), list(range(B)))


def test_dpo_gradient_through_the_whole_model_matches_autograd():
    model = make_model(block_size=16)
    model.eval()
    ref = reference_from(model)
    b = ragged_pair_batch()
    assert (b.targets == -100).any(dim=1).all() and (b.idx == 0).any(), "no masked prompt or padding"
    ref_logp = -torch.rand(2 * b.n_pairs, dtype=DT) * 20
    beta, crit = 0.5, DPOLoss(0.5)

    model.forward(b.idx, b.targets)
    logp = model.sequence_logprobs()
    loss = crit.forward(logp, ref_logp)
    model.zero_grad()
    model.backward(dlogp=crit.backward())

    with torch.enable_grad():
        logits = ref(b.idx)  # (2B, T, V)
        valid = b.targets != -100
        tok = logits.log_softmax(-1).gather(-1, b.targets.clamp_min(0)[..., None]).squeeze(-1)  # (2B, T)
        want_logp = (tok * valid).sum(1)
        want = reference_dpo_loss(want_logp, ref_logp, beta)
        want.backward()
    assert_close(logp, want_logp.detach(), "sequence log-probabilities")
    assert_close(loss, want.detach(), "DPO loss through the model")
    for name, g in model.grads.items():
        assert_close(g, dict(ref.named_parameters())[name].grad, f"grad {name}")


# ---- the preference data -----------------------------------------------------------------------------
def tiny_tokenizer():
    texts = [json.dumps(json.loads(line), ensure_ascii=False) for line in PAIRS.read_text().splitlines()]
    return Tokenizer.build(texts, min_freq=1, max_size=500)


def test_a_reply_is_tokenized_exactly_as_sft_learns_it():
    tok = tiny_tokenizer()
    train, val = prepare_pairs([PAIRS], tok, 64, 0.25, log=lambda *a: None)
    pairs = read_pairs([PAIRS])
    assert len(train) + len(val) == len(pairs) == 12 and len(val) > 0
    seqs = {tuple(ids.tolist()): mask for ps in (train, val) for ids, mask in ps.chosen + ps.rejected}
    for pair in pairs:
        for reply in (pair.chosen, pair.rejected):
            ids, mask = tok.encode_dialogue(pair.turns + [("assistant", reply)])
            assert tuple(ids) in seqs, f"{reply}: not the SFT template"
            n = len(tok.encode_prompt(pair.turns))
            assert ids[:n] == tok.encode_prompt(pair.turns)
            # the targets are SFT's of the last assistant turn (its tokens and <eos>); earlier turns are context
            want = [False] * n + mask[n:]
            assert seqs[tuple(ids)].tolist() == want, f"{reply}: targets are not the reply's tokens"


def test_the_held_out_split_is_decided_by_each_pairs_text():
    tok = tiny_tokenizer()
    _, val_a = prepare_pairs([PAIRS], tok, 64, 0.25, log=lambda *a: None)
    _, val_b = prepare_pairs([PAIRS], tok, 64, 0.25, log=lambda *a: None)
    assert val_a.digest() == val_b.digest()
    reordered = PAIRS.parent / "reordered.jsonl"
    try:
        reordered.write_text("\n".join(reversed(PAIRS.read_text().splitlines())) + "\n", encoding="utf-8")
        _, val_c = prepare_pairs([reordered], tok, 64, 0.25, log=lambda *a: None)
    finally:
        reordered.unlink()
    key = lambda ps: sorted(tuple(ids.tolist()) for ids, _ in ps.chosen)  # noqa: E731
    assert key(val_c) == key(val_a), "reordering the file moved pairs between the splits"


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"prompt": "问", "chosen": "好", "rejected": "差", "score": 1}, "unknown key 'score'"),
        ({"prompt": "问", "conversations": [], "chosen": "好", "rejected": "差"}, "exactly one"),
        ({"chosen": "好", "rejected": "差"}, "exactly one"),
        ({"prompt": "问", "chosen": "好", "rejected": "好"}, "the same reply"),
        ({"prompt": "问", "chosen": "", "rejected": "差"}, '"chosen"'),
        ({"prompt": "问", "chosen": "好"}, '"rejected"'),
        (
            {
                "conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
                "chosen": "好",
                "rejected": "差",
            },
            "end with the user's turn",
        ),
        ({"conversations": [{"role": "system", "content": "x"}], "chosen": "好", "rejected": "差"}, "turn 1"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, record, needle):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt": "问题", "chosen": "好的", "rejected": "差的", "kind": "wrong_fact"}
    f.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(record, ensure_ascii=False) + "\n")
    with pytest.raises(CorpusError) as e:
        read_pairs([f])
    assert str(e.value).startswith(f"{f}:2: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_kind_is_optional_metadata():
    a = parse_pair("x", {"prompt": "问", "chosen": "好", "rejected": "差", "kind": "refusal"})
    b = parse_pair("x", {"prompt": "问", "chosen": "好", "rejected": "差"})
    assert a == b


def test_batches_hold_the_chosen_replies_then_the_rejected_ones():
    tok = tiny_tokenizer()
    train, _ = prepare_pairs([PAIRS], tok, 64, 0.25, log=lambda *a: None)
    seen = []
    for b in PairBatcher(train, 4, seed=1).epoch(0):
        for row, i in enumerate(b.index.tolist()):
            n_c, n_r = len(train.chosen[i][0]) - 1, len(train.rejected[i][0]) - 1
            assert b.idx[row, :n_c].tolist() == train.chosen[i][0][:-1].tolist()
            assert b.idx[b.n_pairs + row, :n_r].tolist() == train.rejected[i][0][:-1].tolist()
        seen += b.index.tolist()
    assert sorted(seen) == list(range(len(train)))


# ---- the reference log-probabilities, cached ---------------------------------------------------------
def test_reference_logprobs_are_cached_by_the_reference_checkpoints_hash(tmp_path):
    tok = tiny_tokenizer()
    train, val = prepare_pairs([PAIRS], tok, 64, 0.25, log=lambda *a: None)
    model = make_model(vocab_size=tok.vocab_size, block_size=64)
    model.eval()
    sets = {"train": train, "val": val}
    calls, logs = [], []

    def model_fn():
        calls.append(1)
        return model

    def get(sha):
        return reference_logprobs(
            sets, {"path": "ref", "sha256": sha}, tmp_path, "fp32", model_fn, 4, logs.append
        )

    first = get("a" * 64)
    assert len(calls) == 1 and len(list(tmp_path.glob("dpo-reference-*.safetensors"))) == 1
    chosen, rejected = score_pairs(model, train, 3)  # another batch size: the same sums
    assert_close(first["train.chosen"], chosen, "cached chosen log-probabilities")
    assert_close(first["train.rejected"], rejected, "cached rejected log-probabilities")
    again = get("a" * 64)
    assert len(calls) == 1, "the same reference was scored twice" and "cache hit" in logs[-1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    get("b" * 64)  # another reference checkpoint: another cache entry
    assert len(calls) == 2 and len(list(tmp_path.glob("dpo-reference-*.safetensors"))) == 2
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"
