"""Rollout engines: one SGLang server per Ray actor, and the pool the driver samples through.

``RolloutEngine`` owns one server process (its own process group, killed with the actor), keeps
the path of the weights it serves so a restart serves the same policy, and turns a dead server
into ``EngineCrashed`` (and a response whose routing was not delivered into ``EngineRoutingFailed``).
``EnginePool`` spreads requests over the engines; when one crashes (the server or the actor) it
restarts it, resends that engine's requests under new keys (so routing of the abandoned attempt
can never be mistaken for the new one) and reports the abandoned keys.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import requests

log = logging.getLogger(__name__)


class EngineCrashed(RuntimeError):
    """The SGLang server behind an engine died or stopped answering."""


class EngineRoutingFailed(EngineCrashed):
    """The server answered but did not deliver the routing it was asked for (its sender thread
    died, or the recording hook failed): the trainer would wait for it in vain, so the engine is
    restarted like a crashed one."""


class EngineConfigError(RuntimeError):
    """The engine would produce rollouts the objective cannot use; it refuses to start."""


class EngineResponseError(RuntimeError):
    """A response does not line up with what was asked (log-probs of other tokens)."""


# SGLang returns log-probs of the unscaled logits (not the sampling distribution) when this is set.
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"


class EngineRestartsExhausted(RuntimeError):
    """An engine kept failing after ``max_restarts`` restarts in one rollout."""


@dataclass(frozen=True)
class EngineSpec:
    index: int
    model_path: str
    log_dir: str
    sglang_args: tuple[str, ...] = ()
    dtype: str = "float32"
    record_routing: bool = True
    weight_version: str = "init"
    """The version tag of the weights at ``model_path``."""
    gpus: int = 0
    tp_size: int = 1
    """SGLang's --tp-size: the engine's ranks in the weight-broadcast group."""
    request_timeout: float = 300.0
    seed: int = 0
    """SGLang's --random-seed (its sampling's generator) unless ``sglang_args`` sets one: a rollout
    reproduces as far as SGLang's batching allows."""


def server_args(spec: EngineSpec, weight_version: str) -> list[str]:
    """The SGLang server's arguments for ``spec`` serving ``weight_version``."""
    args = ["--dtype", spec.dtype, "--weight-version", weight_version, *spec.sglang_args]
    if not any(arg.split("=", 1)[0] == "--random-seed" for arg in spec.sglang_args):
        args += ["--random-seed", str(spec.seed)]
    return ["--record-routing", *args] if spec.record_routing else args


@dataclass(frozen=True)
class RolloutRequest:
    key: str
    """Unique per attempt: the routing's key on the wire."""
    input_ids: tuple[int, ...]
    sampling_params: dict
    routing_sink: str | None = None
    """Collector of the trainer rank that trains on this sample; None: no routing wanted."""


@dataclass(frozen=True)
class RolloutResult:
    key: str
    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    weight_version: str


class RolloutEngine:
    """A Ray actor body (``ray.remote(RolloutEngine)``); usable in-process too."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.model_path = spec.model_path
        self.weight_version = spec.weight_version
        self.restarts = 0
        self.server = self._start()

    def _start(self):
        from routing_replay.sglang.server import SGLangServer

        if os.environ.get(ORIGINAL_LOGPROB_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise EngineConfigError(f"{ORIGINAL_LOGPROB_ENV} is set: SGLang would return log-probs before "
                                    "temperature, so mu_old would not be the sampling distribution; unset it")

        args = server_args(self.spec, self.weight_version)
        log_path = Path(self.spec.log_dir) / f"engine{self.spec.index}-start{self.restarts}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        server = SGLangServer(self.model_path, args, log_path=log_path, die_with_parent=True)
        return server.wait_healthy()

    def ready(self) -> str:
        return self.server.url

    def server_pid(self) -> int:
        return self.server.process.pid

    def generate(self, batch: list[RolloutRequest]) -> list[RolloutResult]:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(batch), 32))) as pool:
            return list(pool.map(self._generate_one, batch))

    def _generate_one(self, request: RolloutRequest) -> RolloutResult:
        from routing_replay.sglang.client import routing_params

        params = dict(request.sampling_params)
        if request.routing_sink is not None:
            params["custom_params"] = routing_params(key=request.key, sink=request.routing_sink)
        body = {"input_ids": list(request.input_ids), "return_logprob": True, "sampling_params": params}
        out = self._post("/generate", body)
        if request.routing_sink is not None:
            check_routing_delivered(self.spec.index, request.key, out)
        logprobs = response_logprobs(self.spec.index, request.key, out)
        return RolloutResult(request.key, tuple(out["output_ids"]), logprobs,
                             str(out["meta_info"].get("weight_version", "")))

    def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """The engine's log-prob of every token after the first (the weight-sync probe)."""
        body = {"input_ids": token_ids, "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 1, "temperature": temperature}}
        meta = self._post("/generate", body)["meta_info"]
        return [float(entry[0]) for entry in meta["input_token_logprobs"][1:]]

    def update_weights(self, path: str, version: str) -> None:
        """Loads the safetensors at ``path`` and flushes cached prefixes computed with older weights."""
        out = self._post("/update_weights_from_disk",
                         {"model_path": path, "weight_version": version, "flush_cache": True})
        if not out.get("success"):
            raise RuntimeError(f"engine {self.spec.index}: weight update to {path} failed: {out.get('message')}")
        self.model_path, self.weight_version = path, version

    def join_weight_group(self, group, rank_offset: int) -> None:
        """Joins the trainer's weight-broadcast group (blocks until every member has joined)."""
        out = self._post("/init_weights_update_group", {
            "master_address": group.master_address, "master_port": group.master_port, "rank_offset": rank_offset,
            "world_size": group.world_size, "group_name": group.name, "backend": group.backend})
        if not out.get("success"):
            raise RuntimeError(f"engine {self.spec.index}: cannot join weight group {group.name}: {out.get('message')}")

    def leave_weight_group(self, name: str) -> None:
        self._post("/destroy_weights_update_group", {"group_name": name})

    def receive_weights(self, meta, group_name: str, version: str, bucket_bytes: int | None = None) -> None:
        """Loads the tensors the trainer broadcasts now, one ``meta.buckets(bucket_bytes)`` bucket per
        request (default ``weight_sync.BUCKET_BYTES``, as the trainer sends them); the last one
        tags the version and flushes cached prefixes of older weights. SGLang wants updates inside
        a begin/end session (it restores packed weights first)."""
        from routing_replay.orchestration.weight_sync import BUCKET_BYTES

        buckets = meta.buckets(BUCKET_BYTES if bucket_bytes is None else bucket_bytes)
        last = len(buckets) - 1
        updates = [("/update_weights_from_distributed", {
            "names": list(bucket.names), "dtypes": list(bucket.dtypes), "shapes": [list(s) for s in bucket.shapes],
            "group_name": group_name, "flush_cache": i == last, "weight_version": version if i == last else None})
            for i, bucket in enumerate(buckets)]
        for path, body in (("/begin_weight_update", {}), *updates, ("/end_weight_update", {})):
            out = self._post(path, body)
            if not out.get("success", True):
                raise RuntimeError(f"engine {self.spec.index}: {path} for weights {version} failed: {out.get('message')}")

    def restart(self) -> int:
        self.server.stop()
        self.restarts += 1
        self.server = self._start()
        return self.restarts

    def stop(self) -> None:
        self.server.stop()

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = requests.post(f"{self.server.url}{path}", json=body, timeout=self.spec.request_timeout)
        except requests.RequestException as exc:
            raise EngineCrashed(f"engine {self.spec.index} ({self.server.url}) did not answer {path}: {exc}") from None
        if response.status_code >= 500 or self.server.process.poll() is not None:
            raise EngineCrashed(f"engine {self.spec.index}: {path} -> HTTP {response.status_code}, server "
                                f"{'exited' if self.server.process.poll() is not None else 'alive'}: {self.server.tail(5)}")
        if response.status_code != 200:
            raise ValueError(f"engine {self.spec.index}: {path} refused the request: {response.text[:500]}")
        return response.json()


class EnginePool:
    """The driver's view of N engine actors."""

    def __init__(self, specs: list[EngineSpec], max_restarts: int = 3,
                 on_restart: Callable[[], None] | None = None,
                 before_restart: Callable[[], None] | None = None,
                 placement: Callable[[int], object] | None = None) -> None:
        """``on_restart`` runs after an engine restarts, before its requests are resent (e.g. to
        bring it the current weights). ``before_restart`` runs when an engine failed, before it is
        restarted; raising stops the rollout (e.g. when the collectors the routing goes to are dead,
        a restart cannot help). ``placement`` gives engine i's Ray scheduling strategy (its bundle
        of the job's placement group; a restarted engine takes the same bundle)."""
        import ray

        self._ray = ray
        self._placement = placement
        self._actor_class = ray.remote(num_cpus=0, max_concurrency=4)(RolloutEngine)
        self.specs = specs
        self.max_restarts = max_restarts
        self.engines = [self._new_actor(spec) for spec in specs]
        ray.get([engine.ready.remote() for engine in self.engines])
        self.restarts = 0
        self.on_restart = on_restart
        self.before_restart = before_restart
        self._latest_weights: tuple[str, str] | None = None

    def generate(self, batch: list[RolloutRequest]) -> tuple[list[RolloutResult], list[str]]:
        """Results in ``batch`` order (keys of resent requests changed) and the abandoned keys."""
        shares = {i: batch[i :: len(self.engines)] for i in range(len(self.engines))}
        results: dict[int, list[RolloutResult]] = {}
        abandoned: list[str] = []
        attempts = dict.fromkeys(shares, 0)
        while len(results) < len(shares):
            futures = {self.engines[i].generate.remote(shares[i]): i for i in shares if i not in results}
            for future, i in futures.items():
                try:
                    results[i] = self._ray.get(future)
                except Exception as exc:  # noqa: BLE001 - EngineCrashed arrives wrapped in a RayTaskError
                    cause = remote_cause(exc)
                    attempts[i] += 1
                    if attempts[i] > self.max_restarts:
                        raise EngineRestartsExhausted(f"engine {i} failed {attempts[i]} times in one rollout; "
                                                      f"last error: {type(cause).__name__}: {cause}") from exc
                    if self.before_restart is not None:
                        self.before_restart()
                    log.warning("engine %d failed mid-rollout (%s: %s); restarting it and resending %d request(s)",
                                i, type(cause).__name__, cause, len(shares[i]))
                    self._restart(i)
                    abandoned += [r.key for r in shares[i]]
                    shares[i] = [replace(r, key=f"{r.key}~{attempts[i]}") for r in shares[i]]
        ordered: list[RolloutResult | None] = [None] * len(batch)
        for i, share in results.items():
            for position, result in zip(range(i, len(batch), len(self.engines)), share):
                ordered[position] = result
        return ordered, abandoned  # type: ignore[return-value]

    def _restart(self, i: int) -> None:
        from ray.exceptions import RayActorError

        self.restarts += 1
        try:
            self._ray.get(self.engines[i].restart.remote())
        except RayActorError:  # the actor itself died: a new one, serving the latest weights
            self._ray.kill(self.engines[i], no_restart=True)
            spec = self.specs[i]
            if self._latest_weights:
                spec = replace(spec, model_path=self._latest_weights[0], weight_version=self._latest_weights[1])
            self.engines[i] = self._new_actor(spec)
            self._ray.get(self.engines[i].ready.remote())
        if self.on_restart is not None:
            self.on_restart()

    def _new_actor(self, spec: EngineSpec):
        strategy = self._placement(spec.index) if self._placement is not None else None
        return self._actor_class.options(num_gpus=spec.gpus, scheduling_strategy=strategy).remote(spec)

    def update_weights(self, path: str, version: str) -> None:
        self._ray.get([engine.update_weights.remote(path, version) for engine in self.engines])
        self._latest_weights = (path, version)

    def rank_offsets(self) -> list[int]:
        """Each engine's first rank in the weight-broadcast group (rank 0 is the trainer)."""
        offsets, next_rank = [], 1
        for spec in self.specs:
            offsets.append(next_rank)
            next_rank += spec.tp_size
        return offsets

    def call_all(self, method: str, *args) -> list:
        """Starts ``method`` on every engine; returns the futures (to wait on with other work)."""
        return [getattr(engine, method).remote(*args) for engine in self.engines]

    def score(self, token_ids: list[int], temperature: float = 1.0) -> list[list[float]]:
        return self._ray.get([engine.score.remote(token_ids, temperature) for engine in self.engines])

    def call(self, i: int, method: str, *args):
        return self._ray.get(getattr(self.engines[i], method).remote(*args))

    def stop(self) -> None:
        for engine in self.engines:
            try:
                self._ray.get(engine.stop.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - stopping a dead actor is fine; kill it regardless
                pass
            self._ray.kill(engine, no_restart=True)


def response_logprobs(engine: int, key: str, response: dict) -> tuple[float, ...]:
    """mu_old of each response token, checked entry by entry against the output ids (SGLang's
    entries are ``[logprob, token_id, text]``): a shifted or truncated list would silently pair
    log-probs with the wrong tokens."""
    output_ids = response["output_ids"]
    entries = response["meta_info"]["output_token_logprobs"]
    if len(entries) != len(output_ids):
        raise EngineResponseError(f"engine {engine}, request {key!r}: {len(entries)} log-probs for "
                                  f"{len(output_ids)} output tokens")
    for position, (entry, token) in enumerate(zip(entries, output_ids)):
        if entry[1] != token:
            raise EngineResponseError(f"engine {engine}, request {key!r}: the log-prob at position {position} is "
                                      f"of token {entry[1]}, the output has {token}")
    return tuple(float(entry[0]) for entry in entries)


def check_routing_delivered(engine: int, key: str, response: dict) -> None:
    """Raises EngineRoutingFailed unless the ``/generate`` response of a request that asked for
    routing says it was queued for its sink under ``key``. The record itself (its missing
    positions included) travels to the trainer's collector; a failure the server finds after this
    response reaches the trainer's ``take`` as RoutingDeliveryFailed."""
    from routing_replay.sglang.client import RoutingNotReturned, routing_descriptor

    try:
        descriptor = routing_descriptor(response)
    except RoutingNotReturned as exc:
        raise EngineRoutingFailed(f"engine {engine}, request {key!r}: {exc}") from None
    if descriptor.get("key") != key:
        raise EngineRoutingFailed(f"engine {engine}, request {key!r}: the routing was recorded as "
                                  f"{descriptor.get('key')!r}")
    if descriptor.get("delivery") != "queued":
        raise EngineRoutingFailed(f"engine {engine}, request {key!r}: the routing was not queued for its sink "
                                  f"(delivery {descriptor.get('delivery')!r})")


def remote_cause(exc: BaseException) -> BaseException:
    """The exception raised inside a Ray task or actor method: ``ray.get`` raises it wrapped in a
    RayTaskError, whose text is a whole traceback."""
    from ray.exceptions import RayTaskError

    return exc.cause if isinstance(exc, RayTaskError) else exc
