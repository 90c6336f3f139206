"""transformers (PyTorch) reference models for parity tests."""

import numpy as np
import torch
import transformers

from fst_jax.models.configs import ModelConfig
from fst_jax.models.weights import hf_to_params, model_from_params


def hf_model(cfg: ModelConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 transformers model of ``cfg``'s architecture, with non-trivial weights.

    Weights are drawn with std 0.1 (so logits are O(1)); norm weights and biases are perturbed
    so that a mix-up of norms, biases or their shapes shows in the logits.
    """
    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    config = transformers.AutoConfig.for_model(**hf_cfg, initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


def state_dict_numpy(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def jax_twin(cfg: ModelConfig, model: transformers.PreTrainedModel):
    """Our ``Transformer`` holding ``model``'s weights."""
    return model_from_params(cfg, hf_to_params(cfg, state_dict_numpy(model)))


def hf_logits(model: transformers.PreTrainedModel, tokens, mask=None, positions=None) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of a transformers model."""
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
        kw["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long), **kw)
    return out.logits.float().numpy()
