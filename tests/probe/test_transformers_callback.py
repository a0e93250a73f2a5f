"""``sonde.transformers.SondeCallback`` on a real Hugging Face ``Trainer`` (models built from configs,
no downloads): steps are optimizer steps (gradient accumulation included), the loss and accuracy
are the model's own, updates come through Accelerate's optimizer wrapper, evaluation is its own
phase. Every number is checked against values the test records itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from collect import Collect
from sonde.errors import ConfigError
from sonde.store import open_store

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from sonde.transformers import SondeCallback  # noqa: E402

VOCAB, LENGTH = 40, 8


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, causal: bool = False) -> None:
        g = torch.Generator().manual_seed(n)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = self.ids.clone() if causal else self.ids[:, 0] % 3  # learnable from the first token
        if causal:
            self.labels[:, :2] = -100  # padding the loss ignores

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Witness(transformers.TrainerCallback):  # type: ignore[misc]
    """What the test sees by itself: every training forward's loss, logits and labels, grouped by
    optimizer step, and the classifier's weight around each optimizer step."""

    def __init__(self, model: torch.nn.Module, weight: torch.Tensor) -> None:
        self.steps: list[list[tuple[float, np.ndarray, np.ndarray]]] = [[]]
        self.evals: list[float] = []
        self.weight, self.updates = weight, []  # type: ignore[var-annotated]
        model.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        item = (float(output.loss.detach()), output.logits.detach().numpy().copy(), kwargs["labels"].numpy().copy())
        if module.training:
            self.steps[-1].append(item)
        else:
            self.evals.append(item[0])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.before = self.weight.detach().numpy().copy()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.updates.append(float(np.linalg.norm(self.weight.detach().numpy() - self.before)))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.steps.append([])


def _train(model: torch.nn.Module, data: Tokens, callback: SondeCallback, weight: torch.Tensor, tmp_path: Path,
           witness: Witness | None = None, **args: Any) -> tuple[Any, Witness]:
    witness = witness or Witness(model, weight)
    training = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[], save_strategy="no",
        use_cpu=True, learning_rate=1e-2, logging_strategy="no", disable_tqdm=True, **args)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data, eval_dataset=data,
                                   callbacks=[callback, witness])
    trainer.train()
    witness.steps.pop()  # opened by the last step's end
    return trainer, witness


def _bert() -> Any:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3, max_position_embeddings=LENGTH)
    return transformers.BertForSequenceClassification(config)


def test_trainer_steps_loss_accuracy_updates_and_eval_match_what_the_trainer_did(
        collect: Collect, tmp_path: Path) -> None:
    model = _bert()
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss", "train_accuracy", "norm"])
    trainer, seen = _train(model, Tokens(48), callback, model.classifier.weight, tmp_path,
                           num_train_epochs=2, gradient_accumulation_steps=2, eval_strategy="epoch")
    assert callback.probe is None  # closed at the end of training
    # 48 examples / 8 per batch / 2 batches per step = 3 optimizer steps per epoch
    assert trainer.state.global_step == 6 and len(seen.steps) == 6 and all(len(s) == 2 for s in seen.steps)
    train = [r for r in collect.records if r.phase == "train"]
    assert sorted({r.step for r in train}) == list(range(6))
    for k, batches in enumerate(seen.steps):
        assert collect.value(step=k, phase="train", topic="loss", metric="loss") == pytest.approx(
            np.mean([loss for loss, _, _ in batches]), rel=1e-6)
        correct = sum(int((logits.argmax(-1) == labels).sum()) for _, logits, labels in batches)
        assert collect.value(step=k, phase="train", metric="train_accuracy") == pytest.approx(correct / 16)
        # the update went through Accelerate's optimizer wrapper, to the real optimizer's step
        assert collect.value(step=k, layer="classifier", topic="weight_updates", metric="norm") == pytest.approx(
            seen.updates[k], rel=1e-5)
    # one evaluation per epoch, filed at the step whose weights it used, its loss the mean of its batches
    evals = sorted({r.step for r in collect.records if r.phase == "eval" and r.metric == "loss"})
    assert evals == [3, 6]
    assert collect.value(step=3, phase="eval", metric="loss") == pytest.approx(np.mean(seen.evals[:6]), rel=1e-6)
    layers = {r.layer for r in train}
    assert {"bert.encoder.layer.0.attention.self.query", "classifier"} <= layers
    assert not any(":" in layer for layer in layers)  # one forward per batch: no repeated-call names


def test_causal_lm_accuracy_scores_each_position_against_the_next_token(collect: Collect, tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss", "train_accuracy"])
    _, seen = _train(model, Tokens(16, causal=True), callback, model.lm_head.weight, tmp_path, num_train_epochs=1)
    assert len(seen.steps) == 2
    for k, [(loss, logits, labels)] in enumerate(seen.steps):
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        keep = target >= 0
        expected = float(((predicted == target) & keep).sum() / keep.sum())
        assert collect.value(step=k, metric="train_accuracy") == pytest.approx(expected)
        assert collect.value(step=k, metric="loss") == pytest.approx(loss, rel=1e-6)


def test_a_causal_lm_loss_is_each_batchs_token_mean_under_gradient_accumulation(
        collect: Collect, tmp_path: Path) -> None:
    """The Trainer has a causal LM divide its loss by the labelled tokens of the whole optimizer step
    (``num_items_in_batch``): the loss sonde records is still the mean over the step's batches of each
    batch's per-token cross-entropy, computed here from the logits and labels the test saw."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    data = Tokens(32, causal=True)
    data.labels[::3, 2:5] = -100  # batches with different numbers of labelled tokens
    callback = SondeCallback(store=None, sinks=[collect], metrics=["loss"])
    _, seen = _train(model, data, callback, model.lm_head.weight, tmp_path, num_train_epochs=1,
                     gradient_accumulation_steps=2)
    assert len(seen.steps) == 2 and all(len(batches) == 2 for batches in seen.steps)
    for k, batches in enumerate(seen.steps):
        means = []
        for _, logits, labels in batches:
            logits, target = logits[:, :-1].astype(np.float64), labels[:, 1:]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            keep = target >= 0
            picked = np.take_along_axis(logp, np.where(keep, target, 0)[..., None], -1)[..., 0]
            means.append(float(-(picked * keep).sum() / keep.sum()))
        assert collect.value(step=k, metric="loss") == pytest.approx(np.mean(means), rel=1e-5)


def test_a_training_that_raises_is_closed_as_failed_with_what_it_recorded(tmp_path: Path) -> None:
    class Breaks(Tokens):  # the 25th example read (the first of the fourth batch) fails
        read = 0

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            self.read += 1
            if self.read > 24:
                raise RuntimeError("corrupt example")
            return super().__getitem__(i)

    model = _bert()
    callback = SondeCallback(run="breaks", store=tmp_path / "s.db", metrics=["loss"])
    witness = Witness(model, model.classifier.weight)
    with pytest.raises(RuntimeError, match="corrupt example"):
        _train(model, Breaks(48), callback, model.classifier.weight, tmp_path, witness, num_train_epochs=1)
    trained = len(witness.updates)  # Accelerate's loader reads a batch ahead: the 4th fails before the 3rd trains
    assert trained >= 2
    assert callback.probe is not None  # the Trainer tells callbacks nothing of the exception
    callback.close()
    assert callback.probe is None
    with open_store(tmp_path / "s.db") as store:
        row = store.runs().set_index("name").loc["breaks"]
        assert row["status"] == "failed"
        assert sorted(store.load("breaks")["step"].unique()) == list(range(trained))


def test_bad_keywords_fail_when_the_callback_is_made() -> None:
    with pytest.raises(ConfigError, match="takes the model and the optimizer from the trainer"):
        SondeCallback(optimizer=None)
    with pytest.raises(ConfigError, match="unexpected keyword.*evry.*every"):
        SondeCallback(evry=10)
