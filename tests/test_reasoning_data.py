"""Reasoning datamodule: generator invariants, batch contract, determinism, leakage, files."""
from __future__ import annotations

import json
import random
from collections import deque

import pytest
import torch

from datamodules.reasoning import (
    ANS,
    DUMMY,
    EOS,
    STEP,
    UNK,
    MultiplicationTask,
    PathStarTask,
    ProsQATask,
    ReasoningDataModule,
    key_hash,
)

SMALL = dict(val_size=40, test_size=40, batch_size=16)


def dm(task="path_star", **kw):
    return ReasoningDataModule(task=task, **{**SMALL, **kw})


def rows(batch):
    """Per example: (question, [steps], answer) as token-id lists, read back through `segments`."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        tok, seg = batch["tokens"][b].tolist(), batch["segments"][b].tolist()
        q = [t for t, s in zip(tok, seg) if s == 0]
        ks = sorted({s for s in seg if s >= 2})
        steps = [[t for t, s in zip(tok, seg) if s == k] for k in ks]
        a = [t for t, s in zip(tok, seg) if s == 1]
        out.append((q, steps, a))
    return out


def words(d, ids):
    return d.decode(ids).split()


# ------------------------------------------------------------------------------------------------ path-star


def parse_path_star(qw):
    edges_part, query = qw[: qw.index("/")], qw[qw.index("/") + 1 :]
    edges = [tuple(int(x) for x in e.split()) for e in " ".join(edges_part).split("|")]
    source, goal = int(query[0]), int(query[1])
    return edges, source, goal


@pytest.mark.parametrize("degree,path_length,num_nodes", [(2, 5, 50), (3, 4, 20), (5, 2, 12)])
def test_path_star_answer_is_the_unique_path(degree, path_length, num_nodes):
    d = dm(degree=degree, path_length=path_length, num_nodes=num_nodes)
    batch = next(iter(d.val_dataloader()))
    goal_arms = set()
    for q, steps, a in rows(batch):
        assert steps == []
        edges, source, goal = parse_path_star(words(d, q))
        assert len(edges) == degree * (path_length - 1)
        aw = words(d, a)
        assert aw[0] == ANS and aw[-1] == EOS
        path = [int(x) for x in aw[1:-1]]
        assert len(path) == path_length and path[0] == source and path[-1] == goal
        assert all(e in edges for e in zip(path, path[1:]))
        succ = {}
        for u, v in edges:
            succ.setdefault(u, []).append(v)
        assert len(succ[source]) == degree and all(len(vs) == 1 for u, vs in succ.items() if u != source)
        reaching = []
        for first in succ[source]:  # follow each arm to its end
            arm = [first]
            while arm[-1] in succ:
                arm.append(succ[arm[-1]][0])
            assert len(arm) == path_length - 1
            if goal in arm:
                reaching.append(arm)
        assert len(reaching) == 1 and reaching[0] == path[1:]
        goal_arms.add(sorted(succ[source]).index(path[1]))
    assert degree == 1 or len(goal_arms) > 1  # the goal arm is not always the same one
    assert d.seq_len == batch["tokens"].shape[1] == PathStarTask(degree, path_length, num_nodes).max_len()


def test_reverse_answer_reverses_the_path():
    fwd, rev = dm(), dm(reverse_answer=True)
    bf, br = next(iter(fwd.val_dataloader())), next(iter(rev.val_dataloader()))
    for (qf, _, af), (qr, _, ar) in zip(rows(bf), rows(br)):
        assert qf == qr
        assert ar[0] == af[0] and ar[-1] == af[-1]  # <ans> ... <eos>
        assert ar[1:-1] == af[1:-1][::-1]
        _, source, goal = parse_path_star(words(rev, qr))
        assert int(words(rev, ar)[1]) == goal and int(words(rev, ar)[-2]) == source
    assert torch.equal(br["answer"][:, 1:], bf["answer"][:, 1:].flip(1))


def test_teacherless_inputs_differ_only_at_answer_tokens():
    d = dm(teacherless=True)
    for batch in (next(iter(d.val_dataloader())), next(iter(d.train_dataloader()))):
        tok, inp, seg = batch["tokens"], batch["inputs"], batch["segments"]
        answer_tok = (seg == 1) & (tok != d.answer_id) & (tok != d.eos_id)
        assert answer_tok.sum(1).eq(5).all()
        assert torch.equal(inp[~answer_tok], tok[~answer_tok])
        assert (inp[answer_tok] == d.dummy_id).all() and (tok[answer_tok] != d.dummy_id).all()
    assert "inputs" not in next(iter(dm().val_dataloader()))
    assert d.decode([d.dummy_id]) == DUMMY


# ------------------------------------------------------------------------------------------------ ProsQA


def parse_prosqa(qw):
    sents = " ".join(qw).split(" . ")  # facts ... "Is Tom a A or B ?"
    ask = sents[-1].split()
    assert ask[0] == "Is" and ask[-1] == "?" and ask[4] == "or" and len(ask) == 7
    entity, a, b = ask[1], ask[3], ask[5]
    graph = {}
    for f in sents[:-1]:
        w = f.split()
        assert w[-3:-1] == ["is", "a"] and len(w) == (5 if w[0] == "Every" else 4)
        child = w[1] if w[0] == "Every" else w[0]
        assert (w[0] == "Every") == (child != entity)
        graph.setdefault(child, set()).add(w[-1])
    return graph, entity, (a, b)


def bfs(graph, start):
    dist, todo = {start: 0}, deque([start])
    while todo:
        u = todo.popleft()
        for v in graph.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
    return dist


def test_prosqa_answer_is_implied_and_the_other_concept_is_not():
    d = dm("prosqa", val_size=60)
    seen_targets = set()
    for batch in d.val_dataloader():
        for q, steps, a in rows(batch):
            graph, entity, options = parse_prosqa(words(d, q))
            aw = words(d, a)
            assert aw[0] == ANS and aw[-1] == EOS and aw[1:4] == [entity, "is", "a"] and aw[5] == "."
            answer = aw[4]
            assert answer in options
            other = options[1 - options.index(answer)]
            dist = bfs(graph, entity)
            assert answer in dist and other not in dist
            # steps: facts of the question along a shortest path entity -> answer
            chain = [entity]
            for s in steps:
                sw = words(d, s)
                assert sw[-1] == STEP and sw[-2] == "."
                child, parent = (sw[1] if sw[0] == "Every" else sw[0]), sw[-3]
                assert child == chain[-1] and parent in graph[child]
                chain.append(parent)
            assert chain[-1] == answer and len(steps) == dist[answer] >= 2
            seen_targets.add(options.index(answer))
    assert seen_targets == {0, 1}
    assert d.seq_len >= max(len(x) for x in d.val_set.examples) and d.seq_len == 384


def test_prosqa_graph_size_and_max_len():
    task = ProsQATask(num_nodes=12, max_len=10_000)
    ex = task.sample(random.Random(1))
    concepts = {w for w in ex.question if w.endswith("pus")}
    assert len(concepts) <= 12
    d = dm("prosqa", num_nodes=12, max_seq_len=120, val_size=30, test_size=30)
    assert all(len(d.val_set[i]["tokens"]) <= 120 for i in range(30))
    assert all(len(d.train_set[i]["tokens"]) <= 120 for i in range(30))


# ------------------------------------------------------------------------------------------------ multiplication


def number(ws, reverse):
    return int("".join(ws[::-1] if reverse else ws))


@pytest.mark.parametrize("digits,reverse", [(4, True), (2, True), (3, False)])
def test_multiplication_steps_sum_to_the_product(digits, reverse):
    d = dm("multiplication", digits=digits, reverse_digits=reverse)
    batch = next(iter(d.val_dataloader()))
    for q, steps, a in rows(batch):
        qw = words(d, q)
        x, y = number(qw[:digits], reverse), number(qw[digits + 1 :], reverse)
        assert qw[digits] == "*" and len(qw) == 2 * digits + 1
        assert 10 ** (digits - 1) <= x < 10**digits and 10 ** (digits - 1) <= y < 10**digits
        assert len(steps) == digits
        partial = []
        for i, s in enumerate(steps):
            sw = words(d, s)
            assert sw[-1] == STEP and len(sw) == digits + 2 + i
            partial.append(number(sw[:-1], reverse))
            assert partial[-1] == x * ((y // 10**i) % 10) * 10**i
        aw = words(d, a)
        assert aw[0] == ANS and aw[-1] == EOS and len(aw) == 2 * digits + 2
        assert sum(partial) == number(aw[1:-1], reverse) == x * y
    assert d.seq_len == batch["tokens"].shape[1] == MultiplicationTask(digits).max_len()


# ------------------------------------------------------------------------------------------------ batch contract


CONTRACT_CASES = [
    ("path_star", dict()),
    ("path_star", dict(train_on="answer", teacherless=True)),
    ("path_star", dict(train_on="all")),
    ("prosqa", dict(train_on="answer")),
    ("prosqa", dict(format="no_cot")),
    ("multiplication", dict()),
    ("multiplication", dict(train_on="answer")),
    ("multiplication", dict(include_steps=False)),
]


@pytest.mark.parametrize("task,kw", CONTRACT_CASES)
def test_batch_contract(task, kw):
    d = dm(task, **kw)
    no_steps = kw.get("format") == "no_cot" or kw.get("include_steps") is False
    for loader in (d.train_dataloader(), d.val_dataloader(), d.test_dataloader()):
        batch = next(iter(loader))
        tok, seg, mask = batch["tokens"], batch["segments"], batch["loss_mask"]
        B, T = tok.shape
        assert tok.dtype == seg.dtype == batch["prompt_len"].dtype == batch["answer"].dtype == torch.long
        assert mask.dtype == torch.float32 and mask.shape == seg.shape == (B, T) and T <= d.seq_len
        assert ((tok >= 0) & (tok < d.vocab_size)).all()
        expect = {"answer": seg == 1, "all": seg >= 0}.get(kw.get("train_on"), seg >= 1)
        assert torch.equal(mask, expect.float())
        for b in range(B):
            s, t, p = seg[b].tolist(), tok[b].tolist(), int(batch["prompt_len"][b])
            n = sum(x >= 0 for x in s)
            assert s[:p] == [0] * p and s[p] != 0 and all(x == -1 for x in s[n:])
            assert all(x == d.pad_id for x in t[n:]) and d.pad_id not in t[:n]
            body = s[p:n]
            ans_start = body.index(1)
            step_part, ans_part = body[:ans_start], body[ans_start:]
            assert all(x == 1 for x in ans_part)
            assert step_part == sorted(step_part) and all(x >= 2 for x in step_part)
            if step_part:
                assert sorted(set(step_part)) == list(range(2, max(step_part) + 1))
            assert not (no_steps and step_part) and (no_steps or task == "path_star" or step_part)
            for k in set(step_part):  # each step ends with the step separator, and holds only that one
                pos = [i for i, x in enumerate(s) if x == k]
                assert t[pos[-1]] == d.step_id and d.step_id not in [t[i] for i in pos[:-1]]
            first = p + ans_start
            assert t[first] == d.answer_id and t[n - 1] == d.eos_id and d.eos_id not in t[:n - 1]
            gold = [x for x in batch["answer"][b].tolist() if x != -1]
            assert gold == t[first : n - 1]
            assert all(x == -1 for x in batch["answer"][b].tolist()[len(gold):])
            # exact-match rule on the gold continuation itself
            gen = t[p:n]
            cut = gen[: gen.index(d.eos_id)]
            assert cut[-len(gold):] == gold


def test_determinism_by_seed():
    a, b, c = dm("prosqa", seed=3), dm("prosqa", seed=3), dm("prosqa", seed=4)
    for split in ("val_dataloader", "test_dataloader", "train_dataloader"):
        ba, bb = next(iter(getattr(a, split)())), next(iter(getattr(b, split)()))
        if split != "train_dataloader":
            assert all(torch.equal(ba[k], bb[k]) for k in ba)
            assert not torch.equal(ba["tokens"][:4, :20], next(iter(getattr(c, split)()))["tokens"][:4, :20])
    for i in (0, 7, 123456):
        assert a.train_set[i] == b.train_set[i] != c.train_set[i]
    assert a.train_set[5] != a.train_set[6]
    assert a.state_dict() == b.state_dict()


def test_fixed_train_size_is_map_style_and_shuffled():
    d = dm("multiplication", train_size=100, batch_size=10)
    assert len(d.train_set) == 100 and len(d.train_dataloader()) == 10
    with pytest.raises(IndexError):
        d.train_set[100]
    assert d.train_set[3] == d.train_set[3]


def test_no_leakage_between_train_and_heldout():
    # k = 1: only 100 distinct problems, so without the exclusion train would hit val/test all the time
    d = ReasoningDataModule(task="multiplication", digits=1, val_size=30, test_size=30, batch_size=8)
    val_keys = {key_hash(e.key) for e in d.val_examples}
    test_keys = {key_hash(e.key) for e in d.test_examples}
    assert len(val_keys) == 30 and len(test_keys) == 30 and not val_keys & test_keys
    train_keys = {key_hash(d.train_set.example(i).key) for i in range(400)}
    assert not train_keys & (val_keys | test_keys)
    assert len(train_keys) == 40  # every remaining problem still shows up
    with pytest.raises(RuntimeError, match="too few"):
        ReasoningDataModule(task="multiplication", digits=1, val_size=60, test_size=60)
    # path-star: the key ignores the edge order, so a reshuffled held-out graph is still caught
    ps = ReasoningDataModule(task="path_star", degree=2, path_length=2, num_nodes=5, val_size=20, test_size=20)

    def canon(ex):
        edges, source, goal = parse_path_star(ex.question)
        return tuple(sorted(edges)), source, goal

    heldout = {canon(e) for e in ps.val_examples + ps.test_examples}
    assert len(heldout) == 40
    train = {canon(ps.train_set.example(i)) for i in range(300)}
    assert not heldout & train and len(train) == 60 - 40  # 5*4*3 graphs x goal / 2 arm orders = 60 problems


def test_attributes_and_tokenizer_state():
    from tokenizers import Tokenizer

    for task in ("path_star", "prosqa", "multiplication"):
        d = dm(task)
        assert isinstance(d.vocab_size, int) and d.vocab_size == len(d.tokenizer.get_vocab())
        assert (d.pad_id, d.eos_id) == (0, 1) and d.decode([d.eos_id, d.step_id, d.answer_id]) == f"{EOS} {STEP} {ANS}"
        assert d.bytes_per_token == 0.0 and d.token_bytes is None  # word-level: bytes per token are undefined
        tok = Tokenizer.from_str(d.state_dict()["tokenizer"])
        ids = d.val_set[0]["tokens"]
        assert tok.encode(d.decode(ids), add_special_tokens=False).ids == ids
        assert tok.get_vocab_size() == d.vocab_size


# ------------------------------------------------------------------------------------------------ files


RECORDS = [
    {"question": f"Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or {w}?",
     "steps": ["Tom is a wumpus.", "Every wumpus is a yumpus."], "answer": "Tom is a yumpus."}
    for w in ["zumpus", "rompus", "gorpus", "impus", "numpus", "tumpus", "vumpus", "lempus", "jompus", "dumpus"]
]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_jsonl_file_loads_and_trains_a_step(tmp_path):
    import lightning as L

    train = write_jsonl(tmp_path / "train.jsonl", RECORDS[:8])
    (tmp_path / "val.json").write_text(json.dumps(RECORDS[8:]))
    d = ReasoningDataModule(task="file", train_file=train, val_file=str(tmp_path / "val.json"), batch_size=4)
    assert len(d.val_set) == 2 and len(d.test_set) == 0 and len(d.train_set) == 8
    batch = next(iter(d.val_dataloader()))
    (q, steps, a), _ = rows(batch)
    # "jompus" appears only in val: the vocabulary comes from the train split, so it reads as <unk>
    assert words(d, q)[-3:] == ["or", UNK, "?"] and len(words(d, q)) == d.val_set[0]["prompt_len"]
    assert [words(d, s) for s in steps] == [["Tom", "is", "a", "wumpus", ".", STEP],
                                            ["Every", "wumpus", "is", "a", "yumpus", ".", STEP]]
    assert words(d, a) == [ANS, "Tom", "is", "a", "yumpus", ".", EOS]
    assert d.seq_len == max(len(d.train_set[i]["tokens"]) for i in range(8))
    assert d.unknown_tokens["val"][0] == 2

    class Tiny(L.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

        def training_step(self, batch, _):
            logits = self.out(self.emb(batch["tokens"][:, :-1]))
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
            mask = batch["loss_mask"][:, 1:]
            loss = (nll * mask).sum() / mask.sum()
            self.steps_seen = getattr(self, "steps_seen", 0) + 1
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny(d.vocab_size)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=d)
    assert model.steps_seen == 1


def test_file_split_leakage_and_tokenizer_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    twice = write_jsonl(tmp_path / "twice.jsonl", RECORDS * 2)  # every question twice
    for s in range(3):  # the val split held out of the file (a tenth): the other copy of its questions is dropped
        with pytest.warns(UserWarning, match="dropped 2 train records"):
            d = ReasoningDataModule(task="file", train_file=twice, seed=s)
        assert len(d.val_set) == 2 and len(d.train_set) == 16 and len(d.test_set) == 0
        held = {d.decode(d.val_set[i]["tokens"][: d.val_set[i]["prompt_len"]]) for i in range(2)}
        for i in range(len(d.train_set)):
            it = d.train_set[i]
            assert d.decode(it["tokens"][: it["prompt_len"]]) not in held
    dup = RECORDS + [RECORDS[0]]  # a question present twice must not end up in both train and held-out
    train = write_jsonl(tmp_path / "all.jsonl", dup)
    val = write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    test = write_jsonl(tmp_path / "test.jsonl", RECORDS[9:])
    with pytest.warns(UserWarning, match="dropped 4 train records"):  # RECORDS[0] twice, RECORDS[1], RECORDS[9]
        d = ReasoningDataModule(task="file", train_file=train, val_file=val, test_file=test)
    assert len(d.train_set) == len(dup) - 4 and len(d.val_set) == 2 and len(d.test_set) == 1
    # a given tokenizer.json: its vocabulary plus the missing special tokens
    texts = [t for r in RECORDS for t in [r["question"], r["answer"], *r["steps"]]]
    words_ = sorted({w for t in texts for w in t.replace(".", " .").replace("?", " ?").split()})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words_)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    d = ReasoningDataModule(task="file", train_file=train, tokenizer_path=str(tmp_path / "tokenizer.json"))
    assert d.vocab_size == len(words_) + 1 + 6 and d.eos_id == len(words_) + 2
    batch = next(iter(d.train_dataloader()))
    assert (batch["tokens"] == d.eos_id).sum() == batch["tokens"].shape[0]
    assert "yumpus" in d.decode(batch["answer"][0])


@pytest.mark.parametrize("content", [None, "", "\n\n", "[]"])
def test_missing_or_empty_file_names_the_path(tmp_path, content):
    path = tmp_path / "nope.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        ReasoningDataModule(task="file", train_file=str(path))
    msg = str(err.value)
    assert str(path) in msg and "question" in msg and "answer" in msg
    if content is None:
        assert "train_file" in msg
    with pytest.raises(ValueError, match="train_file"):
        ReasoningDataModule(task="file")


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_nodes"):
        ReasoningDataModule(task="path_star", degree=3, path_length=5, num_nodes=10)
    with pytest.raises(ValueError):
        ReasoningDataModule(task="sudoku")
    with pytest.raises(ValueError):
        ReasoningDataModule(task="path_star", train_on="everything")


def test_sizes_of_the_shipped_data_config_do_not_apply_to_records_given_as_files(tmp_path):
    """configs/data/prosqa.yaml sizes the generated task (test_size 500 and more); with the user's own files as the
    data, the files are the splits: a test split only from a test file, val from the val file (else a tenth of
    the train file), and every train record kept."""
    import yaml

    from conftest import ROOT
    shipped = yaml.safe_load((ROOT / "configs" / "data" / "prosqa.yaml").read_text())["init_args"]
    assert shipped["train_size"] and shipped["val_size"] and shipped["test_size"]
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS[:6])
    val = write_jsonl(tmp_path / "val.jsonl", RECORDS[6:8])
    test = write_jsonl(tmp_path / "test.jsonl", RECORDS[8:])

    def files(**given):
        d = ReasoningDataModule(**{**shipped, "task": "file", "train_file": train, **given})
        return len(d.train_set), len(d.val_set), len(d.test_set)

    assert files(val_file=val) == (6, 2, 0)
    assert files(val_file=val, test_file=test) == (6, 2, 2)
    assert files(val_file=val, train_size=3) == (6, 2, 0)  # a train size does not cut a file either
    assert files() == (5, 1, 0)  # a lone train file: a tenth, at least one record, held out as val
    d = ReasoningDataModule(**{**shipped, "task": "file", "train_file": train, "val_file": val})
    with pytest.raises(ValueError, match="no test split.*test_file"):
        d.test_dataloader()


def test_countdown_takes_num_numbers_and_refuses_num_nodes():
    d = ReasoningDataModule(task="countdown", num_numbers=4, val_size=3, test_size=3)
    assert all(len(ex.question) == 4 + 2 and len(ex.steps) == 3 for ex in d.val_examples)  # 4 numbers, "->", target
    with pytest.raises(ValueError, match="num_nodes=3 is not a Countdown option.*num_numbers"):
        ReasoningDataModule(task="countdown", num_nodes=3)
    with pytest.raises(ValueError, match="num_numbers=3 is a Countdown option"):
        ReasoningDataModule(task="path_star", num_numbers=3)
