"""FP8 through torchao (pretrain/fp8.py) on CPU, with torchao's emulation (float32 GEMMs after the FP8
rounding): the conversion picks the eligible projections and the model trains on packed documents,
whose segments hold token counts that are not multiples of 16 (the weight-gradient GEMM's inner
dimension; on an H200 ``_scaled_mm`` refused 782 tokens before ``pad_inner_dim``). Opt-in: torchao is
a GPU extra (importing it adds ~0.6 s to every transformers import), so the suite skips this file
where it is not installed (``pip install torchao``)."""
import pytest
import torch

pytest.importorskip("torchao.float8")

from models import MemoryLMForCausalLM, preset_config  # noqa: E402
from pretrain import fp8  # noqa: E402


def test_torchao_fp8_trains_on_packed_documents_of_any_length():
    torch.manual_seed(0)
    cfg = preset_config("test", num_hidden_layers=2, layer_pattern=["ttt_linear", "attention"])
    ref = MemoryLMForCausalLM(cfg)
    model = MemoryLMForCausalLM(cfg)
    model.load_state_dict(ref.state_dict())
    converted = fp8.convert(model, "torchao", emulate=True)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted == len(names) > 0
    assert all(m.config.pad_inner_dim for m in model.modules() if type(m).__name__ == "Float8Linear")
    assert not any(n.endswith(("lm_head", "lr_gate")) for n in names)
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    doc_ids = torch.zeros(2, 45, dtype=torch.long)
    doc_ids[0, 13:], doc_ids[1, 30:] = 1, 1  # segments of 13, 32, 30 and 15 tokens
    loss_ref = ref(ids, labels=ids, doc_ids=doc_ids).loss
    loss = model(ids, labels=ids, doc_ids=doc_ids).loss
    loss.backward()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 0.01 * loss_ref.item()  # FP8 rounding only
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.95, (name, cos.item())
