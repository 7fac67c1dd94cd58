"""Hugging Face causal LM built from memory-layer blocks; the recurrent state is the cache.

    h = embed(ids);  for each block:  [h += conv(RMSNorm(h))]  h += mixer(RMSNorm(h))  h += MLP(RMSNorm(h))
    logits = lm_head(RMSNorm(h))

Every block (and the whole model) maps ``(x, state) -> (y, state)``; generation feeds one token at a
time with the state from the previous step, so it costs O(1) per token.
Only torch/transformers are imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ..common.modules import CausalConv1d, RMSNorm, SwiGLUMLP
from ..common.state import map_tree
from ..common.varlen import (RowStates, doc_starts_from_cu_seqlens, doc_starts_from_ids, doc_starts_from_padding,
                             needs_segments, run_segments)
from ..layers.registry import LAYERS, checkpoint_span
from ..layers.ttt import TTTLayer
from .configuration_memory import MemoryLMConfig


try:  # transformers ≥ 5: initialisers that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


@dataclass
class MemoryState:
    """The model's cache: one dict per block (``mixer``: the layer state, ``pre_conv``: conv tail),
    or a :class:`RowStates` of such dicts when a document reset left the rows at different positions.
    ``position``: tokens fed so far (what generation has consumed of ``input_ids``)."""

    layers: list
    position: int = 0

    def map(self, fn) -> "MemoryState":
        return MemoryState(layers=[map_tree(b, fn) for b in self.layers], position=self.position)

    def detach(self) -> "MemoryState":
        return self.map(torch.Tensor.detach)


@dataclass
class MemoryLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    memory_state: MemoryState | None = None
    hidden_states: tuple | None = None


def build_mixer(config: MemoryLMConfig, layer_idx: int) -> nn.Module:
    """The sequence mixer of block ``layer_idx``: its type's registered builder (models/layers/registry.py)."""
    spec = LAYERS[config.mixer_types[layer_idx]]
    mixer = spec.build(config, layer_idx)
    span = checkpoint_span(spec, config)
    if span:
        mixer.checkpoint_tokens = span
    return mixer


class PreConv(nn.Module):
    """x ↦ conv(RMSNorm(x)): the causal conv in front of the memory layer (Mamba-style backbone)."""

    def __init__(self, config: MemoryLMConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = CausalConv1d(config.hidden_size, config.conv_kernel)

    def forward(self, x, tail=None):
        return self.conv(self.norm(x), tail)


class MemoryBlock(nn.Module):
    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_conv = PreConv(config) if config.pre_conv else None
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def mix(self, x: torch.Tensor, state: dict | None = None):
        """The block's sequence part, x ↦ x + conv(…) + mixer(…), and its state."""
        state = state or {}
        new_state = {}
        if self.pre_conv is not None:
            y, new_state["pre_conv"] = self.pre_conv(x, state.get("pre_conv"))
            x = x + y
        y, new_state["mixer"] = self.mixer(self.mixer_norm(x), state.get("mixer"))
        return x + y, new_state

    def forward(self, x: torch.Tensor, state=None, doc_starts: torch.Tensor | None = None, need_state: bool = True):
        """``doc_starts`` [B, T] (bool): the sequence part restarts from its initial state there
        (models/common/varlen.py); without it, or with no start inside, this is the plain call."""
        if needs_segments(doc_starts, state):
            if doc_starts is None:
                doc_starts = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            x, new_state = run_segments(self.mix, x, doc_starts, state, need_state)
        else:
            x, new_state = self.mix(x, state)
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_state


class MemoryLMPreTrainedModel(PreTrainedModel):
    config_class = MemoryLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemoryBlock"]
    _is_stateful = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TTTLayer):
            for name in module.fast_weight_names:
                p = getattr(module, name)
                init.normal_(p, mean=0.0, std=0.02) if name.startswith("W") else init.zeros_(p)
            init.zeros_(module.token_idx_offset)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
        elif hasattr(module, "reset_memory_parameters"):  # the other memory layers' own parameters
            module.reset_memory_parameters(init)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CausalConv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            bound = 1.0 / module.kernel_size**0.5
            init.uniform_(module.bias, -bound, bound)


class MemoryLMModel(MemoryLMPreTrainedModel):
    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MemoryBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        output_hidden_states: bool = False,
        doc_ids: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = True,
        attention_mask: torch.Tensor | None = None,
    ):
        """Packed documents (every mixer restarts at each document start, see models/common/varlen.py): give
        one of ``doc_ids`` [B, T] (a new document where the id changes; column 0 continues the
        incoming ``memory_state``), ``doc_starts`` [B, T] bool (column 0 True: that row drops its
        incoming state, e.g. a new document while decoding) or ``cu_seqlens`` [N+1] (one flattened
        row, B = 1). ``use_cache=False`` skips the final states of the packed path (training).

        ``attention_mask`` [B, T] (1: token, 0: pad) with left padding: each row is a document that
        starts at its first real token, exactly as if run alone (:func:`models.common.varlen.doc_starts_from_padding`);
        right padding only with ``use_cache=False``; only in a call without ``memory_state``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3 or h.shape[-1] != self.config.hidden_size:
            raise ValueError(f"expected inputs of shape [batch, seq, {self.config.hidden_size}], got {tuple(h.shape)}")
        starts = self._doc_starts(h, doc_ids, doc_starts, cu_seqlens)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(h.shape[:2]):
                raise ValueError(f"attention_mask must have the inputs' shape {tuple(h.shape[:2])}, "
                                 f"got {tuple(attention_mask.shape)}")
            pad_starts = doc_starts_from_padding(attention_mask, allow_right=not use_cache)
            if pad_starts is not None and memory_state is not None:
                raise ValueError("padding is for the first call (the prompt): with a memory_state every row "
                                 "continues its own state, pass an attention_mask of ones or none")
            if pad_starts is not None:
                starts = pad_starts if starts is None else starts | pad_starts
        layer_states = memory_state.layers if memory_state is not None else [None] * len(self.layers)
        new_states, all_hidden = [], []
        for block, st in zip(self.layers, layer_states):
            if self.gradient_checkpointing and self.training:
                h, st = checkpoint(block, h, st, starts, use_cache, use_reentrant=False)
            else:
                h, st = block(h, st, starts, use_cache)
            new_states.append(st)
            if output_hidden_states:
                all_hidden.append(h)
        h = self.norm(h)
        position = (memory_state.position if memory_state is not None else 0) + h.shape[1]
        return MemoryLMOutput(
            last_hidden_state=h,
            memory_state=MemoryState(layers=new_states, position=position),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )

    @staticmethod
    def _doc_starts(h, doc_ids, doc_starts, cu_seqlens):
        """The document-start mask, on the CPU: the blocks plan their segments from it (one copy
        from the device per forward, none per block)."""
        given = [n for n, v in (("doc_ids", doc_ids), ("doc_starts", doc_starts), ("cu_seqlens", cu_seqlens))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass at most one of doc_ids, doc_starts, cu_seqlens (got {', '.join(given)})")
        if cu_seqlens is not None:
            if h.shape[0] != 1:
                raise ValueError(f"cu_seqlens describes one flattened row (batch 1), got batch {h.shape[0]}: "
                                 "use doc_ids [batch, seq] instead")
            return doc_starts_from_cu_seqlens(cu_seqlens.cpu(), h.shape[1])
        mask = doc_ids if doc_ids is not None else doc_starts
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(h.shape[:2]):
            raise ValueError(f"{given[0]} must have the inputs' shape {tuple(h.shape[:2])}, got {tuple(mask.shape)}")
        if doc_ids is not None:
            return doc_starts_from_ids(doc_ids.cpu())
        if doc_starts.dtype != torch.bool:
            raise ValueError(f"doc_starts must be a bool tensor, got {doc_starts.dtype}")
        return doc_starts.cpu()


class MemoryLMForCausalLM(MemoryLMPreTrainedModel, GenerationMixin):
    # transformers.Trainer passes num_items_in_batch (the label count of the whole accumulated batch)
    accepts_loss_kwargs = True
    if _TRANSFORMERS_V5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:  # pragma: no cover
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.model = MemoryLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        doc_ids: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> MemoryLMOutput:
        """Causal LM forward. ``labels`` are the input ids (shifted inside, -100 ignored); the loss
        is their mean, or their sum / ``num_items_in_batch`` when given (transformers.Trainer's count
        over all accumulated micro-batches: gradient accumulation then equals one larger batch).

        ``attention_mask``: left padding is exact (each row as if alone; predictions from or of
        pads leave the loss), right padding only without a cache, see :meth:`MemoryLMModel.forward`.
        Packed documents: ``doc_ids`` / ``doc_starts`` / ``cu_seqlens``.
        """
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.model(input_ids, inputs_embeds, memory_state, bool(output_hidden_states), doc_ids=doc_ids,
                         doc_starts=doc_starts, cu_seqlens=cu_seqlens, use_cache=use_cache,
                         attention_mask=attention_mask)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            if attention_mask is not None:  # a pad neither predicts nor is predicted
                real = attention_mask.to(logits.device).bool()
                targets = targets.masked_fill(~(real[:, :-1] & real[:, 1:]), -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return MemoryLMOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=out.last_hidden_state,
            memory_state=out.memory_state if use_cache else None,
            hidden_states=out.hidden_states,
        )

    # ------------------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent state is the cache

    def _prepare_attention_mask_for_generation(self, inputs_tensor, *args, **kwargs):
        """No padding unless an ``attention_mask`` is given: the pad id may be a real token of a prompt."""
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    def prepare_inputs_for_generation(self, input_ids, memory_state=None, inputs_embeds=None, **kwargs):
        if memory_state is not None:  # the state holds the prefix: feed only the new token (it continues
            # the last document of its row)
            return {"input_ids": input_ids[:, memory_state.position:], "memory_state": memory_state, "use_cache": True}
        # the prompt: its padding (left: each row as if alone) and packed documents (doc_ids / doc_starts /
        # cu_seqlens) apply here
        packed = {k: kwargs[k] for k in ("attention_mask", "doc_ids", "doc_starts", "cu_seqlens")
                  if kwargs.get(k) is not None}
        if inputs_embeds is not None:
            return {"inputs_embeds": inputs_embeds, "use_cache": True, **packed}
        return {"input_ids": input_ids, "use_cache": True, **packed}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1, **kw):
        model_kwargs["memory_state"] = outputs.memory_state
        return model_kwargs

    def _reorder_cache(self, memory_state, beam_idx):
        layers = [RowStates([b.rows[i] for i in beam_idx.tolist()]) if isinstance(b, RowStates)
                  else map_tree(b, lambda t: t.index_select(0, beam_idx.to(t.device))) for b in memory_state.layers]
        return MemoryState(layers=layers, position=memory_state.position)
