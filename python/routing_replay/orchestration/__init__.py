"""Ray orchestration of the RL job: rollout engines, trainer ranks, reward workers and the driver.

Downstream of everything else: it wires SGLang (``sglang``), the wire (``wire``), Megatron
(``megatron``) and the algorithm (``rl``) together; nothing imports it but the CLI.
"""
