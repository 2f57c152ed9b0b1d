"""A callback the DDP test adds through the CLI: each rank saves its final weights for comparison."""
import os

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "step": trainer.global_step, "world": trainer.world_size},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
