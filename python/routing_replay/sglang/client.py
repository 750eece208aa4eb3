"""Client helpers: ask a recording SGLang server for routing and read what it answers.

    payload = {"text": prompt, "sampling_params": {"max_new_tokens": 64,
               "custom_params": routing_params(key="prompt7-sample0", sink=collector.address)}}
    descriptor = routing_descriptor(response_json)          # raises if the server did not record
    sample = collector.get("prompt7-sample0", timeout=60)    # sample.record: its RoutingRecord
    # with routing_params(..., inline=True): routing_record(descriptor) and decode_inline(descriptor)

A request sent to a sink only is answered before its record exists: its descriptor says
``delivery: queued`` with ``key``, ``rows``, ``start``, ``num_tokens``, ``weight_version``,
``sink`` and ``scheduler_errors``; the record reaches the sink (what fails later reaches it as a
``failed`` notice: the collector's ``take`` raises ``RoutingDeliveryFailed``). An inline request's
descriptor is the sample's ``RoutingRecord`` (``routing_replay.wire``) as plain fields, plus the
delivery's: ``delivery`` (queued, inline, not-this-rank or failed), ``sink``, ``error``,
``scheduler_errors``, and ``inline``/``inline_valid`` (base64 rows and mask). A failed one carries
only what is known (key, rows, start, num_tokens, missing) besides the delivery's fields.

With the OpenAI endpoints, pass ``custom_params=routing_params(...)`` at the top level of the
request (``extra_body`` with the ``openai`` client); the descriptor is then not part of the OpenAI
response schema, so use a sink (``/v1/*`` responses carry no ``meta_info``) or ``/generate``.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

import msgspec
import numpy as np
import torch

from routing_replay.sglang.options import REQUEST_KEY
from routing_replay.wire import RoutingRecord, WireFormatError


class RoutingNotReturned(RuntimeError):
    """The response carries no routing descriptor although routing was requested."""


def routing_params(key: str | None = None, start_len: int = 0, sink: str | None = None, inline: bool = False) -> dict:
    """The ``custom_params`` entry that asks a recording server for a request's routing."""
    spec: dict[str, Any] = {"start_len": start_len, "inline": inline}
    if key is not None:
        spec["key"] = key
    if sink is not None:
        spec["sink"] = sink
    return {REQUEST_KEY: spec}


def routing_descriptor(response: dict) -> dict:
    """The routing descriptor of a ``/generate`` response, or RoutingNotReturned."""
    entries = response.get("meta_info", {}).get(REQUEST_KEY)
    if not entries:
        raise RoutingNotReturned(
            "the response has no meta_info.routing_replay: the routing-replay plugin is not active in this "
            "SGLang server (not installed, excluded by SGLANG_PLUGINS, or failed to load; see its log)"
        )
    descriptor = entries[0]
    if descriptor.get("delivery") == "failed":
        raise RoutingNotReturned(f"routing was not delivered: {descriptor.get('error')}")
    return descriptor


def routing_record(descriptor: dict) -> RoutingRecord:
    """The RoutingRecord of a delivered descriptor (its record fields, decoded and validated by
    msgspec and ``RoutingRecord.validate``); RoutingNotReturned naming the problem otherwise."""
    fields = {name: descriptor[name] for name in ("type", *RoutingRecord.__struct_fields__) if name in descriptor}
    try:
        record = msgspec.convert(fields, RoutingRecord)
        record.validate(max_payload_bytes=sys.maxsize)
    except (msgspec.ValidationError, WireFormatError) as exc:
        raise RoutingNotReturned(f"the routing descriptor holds no valid routing record: {exc}") from None
    return record


def decode_inline(descriptor: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [rows, layers, top_k], valid [rows, layers] or None)`` from an inline descriptor."""
    if "inline" not in descriptor:
        raise RoutingNotReturned("the descriptor has no inline routing: ask with inline=True")
    record = routing_record(descriptor)
    ids = np.frombuffer(base64.b64decode(descriptor["inline"]), dtype=np.dtype(record.dtype)).reshape(record.shape)
    valid = None
    if "inline_valid" in descriptor:
        valid = torch.from_numpy(np.frombuffer(base64.b64decode(descriptor["inline_valid"]), dtype=np.bool_)
                                 .reshape(record.rows, record.layers).copy())
    return torch.from_numpy(ids.copy()), valid
