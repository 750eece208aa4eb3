"""How every settings dataclass validates: one definition per setting, used as is by the job's YAML.

A component's settings are a ``pydantic.dataclasses.dataclass(frozen=True, config=SETTINGS)``: the
dataclass the component takes, and the section of the job configuration (``config.JobConfig``)
that users write. Unknown keys are refused (naming the key), NaN and infinity are refused, and
each field is declared ``strict=True`` (no silent conversions: ``steps: true`` is not 1,
``lr: "0.1"`` is not 0.1; an integer is still accepted for a float). Strictness is set per field
because a strict dataclass would refuse the mapping a YAML section is.
"""

from __future__ import annotations

from pydantic import ConfigDict

SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False)
