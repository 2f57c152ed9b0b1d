"""Frozen companions: a network built from a project checkpoint that an objective holds (a teacher, a reverse LM),
in eval mode, outside the optimizer and DDP's gradient buckets, stored in checkpoints by path and hash only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import quickstart, run_cli
from ntp_checkpoint import ntp_checkpoint
from objectives import NextTokenPrediction
from objectives.training.checkpoints import FrozenCompanion, load_checkpoint, load_objective, weights_sha256


class WithCompanion(NextTokenPrediction):
    """Next-token prediction plus a small KL term towards a frozen companion's next-token distribution."""

    def __init__(self, *args, companion: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = FrozenCompanion(companion)

    def loss(self, batch):
        out = super().loss(batch)
        inputs = batch["tokens"][:, :-1]
        with torch.no_grad():
            target = self.reference.model.logits(self.reference.model.hidden(inputs)).log_softmax(-1)
        student = self.logits(self.hidden(inputs)).log_softmax(-1)
        out["loss"] = out["loss"] + 0.1 * F.kl_div(student, target, log_target=True, reduction="batchmean")
        return out

    def forward(self, batch):  # for the bare DDP wrapper below
        return self.loss(batch)["loss"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_files):
    """(NTP checkpoint, the CLI run of WithCompanion trained 2 steps against it)."""
    tmp = tmp_path_factory.mktemp("companion")
    ntp_ckpt = ntp_checkpoint(tuple(corpus_files))
    cli = run_cli(tmp / "with", *quickstart(corpus_files, "--model", "test_companions.WithCompanion",
                                            "--model.init_args.companion", str(ntp_ckpt)), steps=2)
    return ntp_ckpt, cli


def test_companion_is_frozen_outside_the_optimizer_and_moves_with_the_module(trained):
    ntp_ckpt, cli = trained
    model, companion = cli.model, cli.model.reference
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    frozen = list(companion.parameters())
    assert frozen and not any(id(p) in optimized for p in frozen) and not any(p.requires_grad for p in frozen)
    assert optimized == {id(p) for n, p in model.named_parameters() if not n.startswith("reference.")}
    model.train()
    assert model.training and not any(m.training for m in companion.modules())
    # two training steps later the companion still holds the checkpoint's weights
    saved = load_checkpoint(ntp_ckpt)["state_dict"]
    assert all(torch.equal(companion.model.state_dict()[k], v) for k, v in saved.items())
    model.double()
    assert all(p.dtype == torch.float64 for p in frozen)
    model.float()


def test_checkpoint_stores_path_and_hash_and_refuses_another_companion(trained, tmp_path):
    ntp_ckpt, cli = trained
    run_ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    checkpoint = load_checkpoint(run_ckpt)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("reference.")]
    record = checkpoint["companions"]["reference"]
    assert record["path"] == str(ntp_ckpt)
    assert record["sha256"] == weights_sha256(load_checkpoint(ntp_ckpt)["state_dict"])
    reloaded = load_objective(run_ckpt)  # strict load: the companion is rebuilt from its path
    assert torch.equal(reloaded.embed.weight, cli.model.embed.weight)
    assert reloaded.reference.sha256 == record["sha256"]

    record["sha256"] = "0" * 64  # as if the companion file had been replaced since
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    with pytest.raises(ValueError, match=r"companion 'reference'.*hashes to.*the file changed"):
        load_objective(tampered)


def test_ddp_replicates_the_companion_without_gradient_buckets(trained):
    """find_unused_parameters=False: a companion parameter in a gradient bucket would get no gradient and stop
    the second step with DDP's unfinished-reduction error."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ntp_ckpt, cli = trained
    model = cli.model.float().train()
    batch = {"tokens": torch.randint(0, model.vocab_size, (2, 17)), "loss_mask": torch.ones(2, 17)}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        before = [p.clone() for p in model.reference.parameters()]
        for _ in range(3):
            optimizer.zero_grad()
            ddp(batch).backward()
            optimizer.step()
        assert all(p.grad is None for p in model.reference.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, model.reference.parameters()))
    finally:
        dist.destroy_process_group()
