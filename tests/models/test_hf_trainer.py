"""transformers.Trainer: gradient accumulation gives the loss and gradients of one larger batch
(the model divides the summed token losses by Trainer's num_items_in_batch)."""
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from models import MemoryLMForCausalLM, preset_config

# float32: the accumulated gradient is a sum of 4 partial sums instead of one, measured ≤ 4.3e-7
# relative to each parameter's gradient scale; the logged loss and grad norm agree to ≤ 1e-6.
GRAD_TOL = 2e-6


class Rows(torch.utils.data.Dataset):
    """8 rows whose numbers of labelled tokens differ (0 to 14 of the first tokens are −100), so a
    per-micro-batch mean would weigh tokens unequally."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (8, 16), generator=g)
        self.labels = self.ids.clone()
        for i in range(8):
            self.labels[i, :2 * i] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Grads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_model():
    torch.manual_seed(0)
    return MemoryLMForCausalLM(preset_config("test", layer_pattern=["ttt_linear", "swa"]))


def train_one_step(tmp_path, micro_batch, accumulation):
    grads = Grads()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=micro_batch, max_steps=1,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, max_grad_norm=1e9,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=Rows(), callbacks=[grads])
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return log["loss"], float(log["grad_norm"]), grads.grads


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """One optimizer step over all 8 rows: 4 micro-batches of 2 = one batch of 8 = the model's own loss."""
    rows = Rows()
    direct = tiny_model()(rows.ids, labels=rows.labels).loss.item()
    loss1, norm1, g1 = train_one_step(tmp_path / "one", 8, 1)
    loss4, norm4, g4 = train_one_step(tmp_path / "acc", 2, 4)
    assert abs(loss1 - direct) <= 1e-6 * direct and abs(loss4 - direct) <= 1e-6 * direct, (direct, loss1, loss4)
    assert abs(norm4 - norm1) <= 1e-6 * norm1, (norm1, norm4)
    assert g1.keys() == g4.keys()
    for name in g1:
        err = ((g4[name] - g1[name]).abs().max() / g1[name].abs().max().clamp_min(1e-12)).item()
        assert err <= GRAD_TOL, (name, err)
