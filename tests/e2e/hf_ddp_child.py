"""One rank of the Hugging Face ``Trainer`` run of test_distributed_remote.py on two CPU processes (gloo),
launched by the test as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set),
from its temporary directory.

Usage: ``python hf_ddp_child.py OUT``: a tiny BERT classifier built from a config (no download, no
dropout) trained by the Trainer (no gradient clipping) with ``SondeCallback(store=OUT/hf.db, every=1)``.
Each rank writes ``OUT/batches<r>.pt``, the ``input_ids`` and ``labels`` of each of its training forwards in order,
and rank 0 ``OUT/weights.pt``, the model's state at the start of each optimizer step (the same on
every rank under DDP) and ``OUT/rank0.json`` with the Trainer's step count.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import ranks
import torch
import transformers

from sonde.transformers import SondeCallback

VOCAB, LENGTH, EXAMPLES, PER_DEVICE = 40, 8, 32, 4


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def make_model() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3, max_position_embeddings=LENGTH,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class Witness(transformers.TrainerCallback):  # type: ignore[misc]
    """Each training forward's inputs, and the weights each optimizer step starts from."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.batches: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        model.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if module.training:
            self.batches.append({"input_ids": kwargs["input_ids"].clone(), "labels": kwargs["labels"].clone()})

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    model = make_model()
    witness = Witness(model)
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=PER_DEVICE, num_train_epochs=1,
        learning_rate=1e-2, use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0,
        # the model's loss is its own batch's mean; the Trainer's default would multiply it by the number
        # of processes (for losses divided by the items of the whole global batch)
        average_tokens_across_devices=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[SondeCallback(store=str(out / "hf.db"), every=1), witness])
    trainer.train()
    torch.save(witness.batches, out / f"batches{rank}.pt")
    if rank == 0:
        torch.save(witness.weights, out / "weights.pt")
        (out / "rank0.json").write_text(json.dumps({"steps": trainer.state.global_step,
                                                    "world": trainer.args.world_size}))
    # Tear the group down with both ranks done (a gloo group left to the interpreter's exit can abort a rank
    # whose peer has already closed the connection).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks.run(main, Path(sys.argv[1]))
