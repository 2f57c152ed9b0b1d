"""val/accuracy scores the objective's own generation by exact match, checked with hand-made generators."""
from __future__ import annotations

import torch

from datamodules.reasoning import ReasoningDataModule
from models import Transformer
from objectives import NextTokenPrediction


def scored(generate_fn) -> dict[str, float]:
    data = ReasoningDataModule(task="multiplication", digits=2, val_size=16, test_size=16, batch_size=8)
    batch = next(iter(data.val_dataloader()))
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=256),
                                vocab_size=data.vocab_size, eos_id=data.eos_id)
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.generate = lambda prompt, max_new, **kw: generate_fn(batch, prompt, max_new, data)
    model.score_answers(batch)
    return logged


def gold(batch, prompt, max_new, data):
    """The reference continuation: each row's own tokens, looked up by its prompt, then eos."""
    rows = [next(i for i in range(len(batch["tokens"])) if torch.equal(batch["tokens"][i, : prompt.shape[1]], p))
            for p in prompt]
    out = batch["tokens"][rows, : prompt.shape[1] + max_new].clone()
    out[out == data.pad_id] = data.eos_id
    return torch.nn.functional.pad(out, (0, prompt.shape[1] + max_new - out.shape[1]), value=data.eos_id)


def test_a_perfect_generator_scores_one():
    logged = scored(gold)
    assert logged["val/accuracy"] == 1.0 and logged["val/answer_tokens"] > 3


def test_a_generator_with_one_wrong_answer_token_scores_zero():
    def wrong(batch, prompt, max_new, data):
        out = gold(batch, prompt, max_new, data)
        for row in out:
            last = (row == data.eos_id).nonzero()[0, 0] - 1  # the final answer token, just before eos
            row[last] = (row[last] + 1) % data.vocab_size if row[last] + 1 != data.eos_id else row[last] + 2
        return out

    assert scored(wrong)["val/accuracy"] == 0.0


def test_a_generator_that_never_answers_scores_zero():
    assert scored(lambda batch, prompt, max_new, data: torch.nn.functional.pad(
        prompt, (0, max_new), value=data.eos_id))["val/accuracy"] == 0.0


def test_teacherless_decoding_reads_the_dummy_token_after_the_answer_marker():
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), vocab_size=20).eval()
    torch.nn.init.normal_(model.embed.weight)  # varied outputs from a random model
    prompt = torch.randint(0, 20, (1, 6))
    marker = int(model.generate(prompt, 1)[0, -1])  # make the first generated token the answer marker
    dummy = (marker + 1) % 20
    out = model.generate(prompt, 6, teacherless=(marker, dummy))
    # reference: full forwards over prompt, marker, then dummies; each step's argmax is the next output token
    inputs, expected = prompt[0].tolist() + [marker], [marker]
    for _ in range(5):
        logits = model.logits(model.hidden(torch.tensor([inputs])))[0, -1]
        expected.append(int(logits.argmax()))
        inputs.append(dummy)
    assert out[0, 6:].tolist() == expected
    assert out[0, 6:].tolist() != model.generate(prompt, 6)[0, 6:].tolist()  # reading its own tokens differs


def test_teacherless_scoring_uses_teacherless_decoding():
    data = ReasoningDataModule(task="path_star", teacherless=True, train_on="answer", format="no_cot",
                               val_size=8, test_size=8, batch_size=8)
    batch = next(iter(data.val_dataloader()))
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=64),
                                vocab_size=data.vocab_size, eos_id=data.eos_id)
    seen = {}
    model.log = lambda name, value, **kw: None
    original = model.generate
    model.generate = lambda prompt, max_new, **kw: seen.update(kw) or original(prompt, max_new, **kw)
    model.score_answers(batch)
    assert seen["teacherless"] == (data.answer_id, data.dummy_id)
