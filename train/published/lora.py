"""LoRA (peft) on the query and value projections of any published tower, and merging it back.

The paper puts LoRA (r=8, alpha=8, dropout 0.1) on the query/value projections of both towers of every
teacher. Published towers spell those projections three ways:

* separate linears: ``query``/``value`` (BERT and most HF text models), ``q_proj``/``v_proj`` (HF CLIP);
* one fused ``qkv`` linear (timm ViTs, e.g. BiomedCLIP's image tower);
* ``nn.MultiheadAttention`` with a fused ``in_proj`` (open_clip's own ViT and text transformer).

For the fused forms peft adapts the whole fused projection; the rows of the key third of ``lora_B`` get a
gradient mask, and since ``lora_B`` starts at zero (and AdamW keeps a parameter with zero gradient at zero)
the adapter stays exactly a query/value adapter. peft's ``MultiheadAttention`` layer also adapts
``out_proj``; that adapter is frozen at its zero start.
"""

from __future__ import annotations

import torch
from torch import nn

SEPARATE_QV = ("query", "value", "q_proj", "v_proj")
FUSED_QKV = ("qkv",)


def qv_targets(root: nn.Module) -> list[str]:
    """Full names of the query/value projections (or fused q/k/v projections) inside ``root``."""
    names = []
    for name, module in root.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in SEPARATE_QV + FUSED_QKV:
            names.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            names.append(name)
    return names


def adaptable(root: nn.Module) -> bool:
    """Whether ``root`` has query/value projections, or already carries adapters on them."""
    from peft.tuners.lora import LoraLayer

    return bool(qv_targets(root)) or any(isinstance(m, LoraLayer) for m in root.modules())


def _mask_key_rows(lora_b: nn.Linear) -> None:
    """Zero the gradient of the key third of a fused q/k/v adapter's B matrix (see the module docstring)."""
    third = lora_b.out_features // 3
    mask = torch.ones(lora_b.out_features, 1, device=lora_b.weight.device)
    mask[third:2 * third] = 0
    lora_b.weight.register_hook(lambda grad: grad * mask.to(grad.dtype))


def add_qv_lora(root: nn.Module, rank: int = 8, alpha: float = 8, dropout: float = 0.1) -> list[nn.Parameter]:
    """Inject LoRA adapters into ``root`` in place and return their trainable parameters.

    Everything else in ``root`` is frozen."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = qv_targets(root)
    if not targets:
        raise ValueError(f"No query/value projections found in {type(root).__name__}.")
    for p in root.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), root)
    trainable = []
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        inside_mha = isinstance(_parent(root, name), nn.MultiheadAttention)
        for p in (*module.lora_A.parameters(), *module.lora_B.parameters()):
            p.requires_grad_(not inside_mha)
        if inside_mha:
            continue
        if isinstance(base, nn.MultiheadAttention) or name.rsplit(".", 1)[-1] in FUSED_QKV:
            for lora_b in module.lora_B.values():
                _mask_key_rows(lora_b)
        trainable += [p for p in (*module.lora_A.parameters(), *module.lora_B.parameters())]
    return trainable


def _parent(root: nn.Module, name: str) -> nn.Module | None:
    return root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None


@torch.no_grad()
def merge_qv_lora(root: nn.Module) -> None:
    """Fold every adapter into its base weights and put the plain base layers back (the published layout)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in root.named_modules()
              if isinstance(m, LoraLayer) and not isinstance(_parent(root, name), nn.MultiheadAttention)]
    for name, module in layers:  # an MHA's own out_proj adapter is merged with the MHA
        if isinstance(module.get_base_layer(), nn.MultiheadAttention):
            merged = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            module.merge()
            merged = module.get_base_layer()
        parent, leaf = (_parent(root, name), name.rsplit(".", 1)[-1]) if "." in name else (root, name)
        setattr(parent if parent is not None else root, leaf, merged)
