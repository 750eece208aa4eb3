"""Fixes for megatron-core 0.16's DistributedOptimizer checkpoints where torch's Adam stands in for
TransformerEngine's or Apex's FusedAdam (any machine without either, GPU or not).

Applied by ``apply()`` only when megatron-core fell back to torch's optimizer
(``USING_PYTORCH_OPTIMIZER``); with FusedAdam the state layout these fix does not occur. Found by
saving and loading the distributed optimizer at world size 1, data-parallel 2 and expert-parallel 2:
without them a fresh optimizer cannot build its load template, a resume restarts Adam's step count
at 0, and every parameter shares one step counter.
"""

from __future__ import annotations

import functools

import torch

_applied = False


def apply() -> None:
    global _applied
    from megatron.core import optimizer as megatron_optimizer

    if _applied or not megatron_optimizer.USING_PYTORCH_OPTIMIZER:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _fresh_state_for_loading(DistributedOptimizer)
    _copy_states_without_step(DistributedOptimizer)
    _unshared_steps_after_load(DistributedOptimizer)
    _applied = True


def _fresh_state_for_loading(owner: type) -> None:
    """``state_dict()`` asserts that torch Adam's per-param ``step`` exists; a fresh optimizer has
    none, so ``sharded_state_dict(is_loading=True)`` fails. Zero moments and step 0 first (the
    checkpoint's values replace them on load)."""
    original = owner.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and self.optimizer is not None and self.init_state_fn is not None:
            self.init_state_fn(self.optimizer, self.config)
            for state in self.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))
        return original(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    owner.sharded_state_dict = sharded_state_dict


def _copy_states_without_step(owner: type) -> None:
    """``_set_main_param_and_optimizer_states`` copies every key of torch Adam's state, ``step``
    included: ``dp_reshardable`` then overwrites the restored step with the template's 0. The step
    comes back through ``param_groups`` already; copy the tensors only, under no_grad (an fp32
    parameter's main param is a view of the parameter: an in-place copy into a leaf view fails)."""
    original = owner._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, tensor in destinations.items():
                if key != "step":
                    tensor.copy_(tensors[key])
        return None

    owner._set_main_param_and_optimizer_states = set_states


def _unshared_steps_after_load(owner: type) -> None:
    """``load_state_dict`` gives every parameter's state the *same* ``step`` tensor, which torch's
    foreach Adam then increments once per parameter per step (wrong bias correction after a
    resume): each parameter gets its own copy."""
    original = owner.load_state_dict

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        return result

    owner.load_state_dict = load_state_dict
