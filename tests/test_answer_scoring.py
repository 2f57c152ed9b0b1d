"""val/accuracy scores the objective's own generation by exact match, checked with hand-made generators."""
from __future__ import annotations

import torch

from datamodules.reasoning import ReasoningDataModule
from models import Transformer
from objectives import NextTokenPrediction
from objectives.decoding.scoring import generate_answers


def scored(generate_fn) -> dict[str, float]:
    data = ReasoningDataModule(task="multiplication", digits=2, val_size=16, test_size=16, batch_size=8)
    batch = next(iter(data.val_dataloader()))
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=256),
                                vocab_size=data.vocab_size, eos_id=data.eos_id)
    logged = {}
    model.log = lambda name, metric, **kw: logged.__setitem__(
        name, float(metric.compute()) if hasattr(metric, "compute") else float(metric))
    model.generate = lambda prompt, max_new, prompt_lengths=None, **kw: generate_fn(batch, prompt, max_new, data,
                                                                                    prompt_lengths)
    model.score_answers(batch)
    return logged


def gold(batch, prompt, max_new, data, prompt_lengths=None):
    """The reference continuation: each row's own tokens, looked up by its prompt (its first prompt_lengths[b]
    tokens), then eos; a row's generation follows its own prompt, as generate lays out ragged rows."""
    lengths = [prompt.shape[1]] * len(prompt) if prompt_lengths is None else prompt_lengths.tolist()
    budgets = torch.as_tensor(max_new).expand(len(prompt)).tolist()
    width = max(n + m for n, m in zip(lengths, budgets))
    rows = [next(i for i in range(len(batch["tokens"])) if int(batch["prompt_len"][i]) == n
                 and torch.equal(batch["tokens"][i, :n], p[:n])) for p, n in zip(prompt, lengths)]
    out = batch["tokens"][rows, :width].clone()
    out[out == data.pad_id] = data.eos_id
    return torch.nn.functional.pad(out, (0, width - out.shape[1]), value=data.eos_id)


def test_a_perfect_generator_scores_one():
    logged = scored(gold)
    assert logged["val/accuracy"] == 1.0 and logged["val/answer_tokens"] > 3
    # 2-digit multiplication has 2 steps: the accuracy by step count, and every answer in the gold's shape
    assert logged["val/accuracy_2_steps"] == 1.0 and logged["val/answer_format"] == 1.0


def test_a_generator_with_one_wrong_answer_token_scores_zero():
    def wrong(batch, prompt, max_new, data, prompt_lengths):
        out = gold(batch, prompt, max_new, data, prompt_lengths)
        for row in out:
            last = (row == data.eos_id).nonzero()[0, 0] - 1  # the final answer token, just before eos
            row[last] = (row[last] + 1) % data.vocab_size if row[last] + 1 != data.eos_id else row[last] + 2
        return out

    logged = scored(wrong)
    assert logged["val/accuracy"] == 0.0 and logged["val/accuracy_2_steps"] == 0.0
    assert logged["val/answer_format"] == 1.0  # wrong, but an answer of the right shape


def test_a_generator_that_never_answers_scores_zero():
    logged = scored(lambda batch, prompt, max_new, data, prompt_lengths: torch.nn.functional.pad(
        prompt, (0, int(torch.as_tensor(max_new).max())), value=data.eos_id))
    assert logged["val/accuracy"] == 0.0 and logged["val/answer_format"] == 0.0


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


def test_the_whole_batch_is_generated_at_once_with_the_budgets_of_the_per_length_loop():
    """One generate call for prompts of every length, and the same generations as one call per prompt length."""
    data = ReasoningDataModule(task="prosqa", val_size=8, test_size=8, batch_size=8)
    batch = next(iter(data.val_dataloader()))
    assert len(batch["prompt_len"].unique()) > 2
    torch.manual_seed(0)
    model = NextTokenPrediction(Transformer(d_model=32, n_layers=1, n_heads=2, max_seq_len=512),
                                vocab_size=data.vocab_size, eos_id=data.eos_id).eval()
    torch.nn.init.normal_(model.embed.weight)
    calls = []
    original = model.generate
    model.generate = lambda prompt, max_new, **kw: calls.append(prompt.shape) or original(prompt, max_new, **kw)
    tokens, prompt_len = batch["tokens"], batch["prompt_len"]
    batched = generate_answers(model, tokens, prompt_len, None)
    assert len(calls) == 1
    per_length = generate_answers(model, tokens, prompt_len, None, ragged=False)
    assert len(calls) == 1 + len(prompt_len.unique())
    assert batched == per_length
    assert [len(g) for g in batched] == (tokens.shape[1] - prompt_len + model.generation_slack).tolist()


def test_an_answer_one_token_short_is_out_of_format():
    """answer_format counts answers of the gold's shape: the marker, then as many tokens as the gold answer."""
    def short(batch, prompt, max_new, data, prompt_lengths):
        out = gold(batch, prompt, max_new, data, prompt_lengths)
        for row in out:
            last = (row == data.eos_id).nonzero()[0, 0] - 1  # the final answer token becomes eos
            row[last] = data.eos_id
        return out

    logged = scored(short)
    assert logged["val/accuracy"] == 0.0 and logged["val/answer_format"] == 0.0
