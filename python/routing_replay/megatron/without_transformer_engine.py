"""megatron-core 0.16.1 on a machine without TransformerEngine (CPU or GPU): the one correction of
a foreign module it needs for multi-head latent attention. Listed in ``routing_replay.integration_surface``."""

from __future__ import annotations


def multi_latent_attention_knows_te_is_absent() -> None:
    """Makes ``megatron.core.transformer.multi_latent_attention`` see TransformerEngine as absent
    when it is absent. Idempotent; does nothing where TransformerEngine is installed.

    What: sets that module's ``HAVE_TE`` to False and its ``TEColumnParallelLinear``, ``TELinear``,
    ``Linear`` and ``set_save_original_input`` to None, exactly what its own ``except ImportError``
    branch does.

    Why: it decides ``HAVE_TE`` by importing ``megatron.core.extensions.transformer_engine``, which
    imports without TransformerEngine too (its TE classes are then ``MagicMock``s, its own
    ``HAVE_TE`` False), so the module believes TE is there; building ``MLASelfAttention`` then calls
    ``isinstance(self.linear_proj, TELinear)`` with a ``MagicMock`` and fails with ``TypeError:
    isinstance() arg 2 must be a type``."""
    from megatron.core.extensions import transformer_engine as te_extensions
    from megatron.core.transformer import multi_latent_attention as mla

    if te_extensions.HAVE_TE or not mla.HAVE_TE:
        return
    mla.TEColumnParallelLinear = mla.TELinear = mla.Linear = mla.set_save_original_input = None
    mla.HAVE_TE = False
