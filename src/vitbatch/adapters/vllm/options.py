"""What a user sets, and where vitbatch finds it in vLLM's config.

Three switches carry the same options (:class:`VllmOptions`), checked in this order:

1. ``--additional-config '{"vitbatch": {...}}'`` (``LLM(additional_config=...)``):
   vLLM's place for plugin settings, present in every supported release (0.26+).
2. ``VITBATCH_VLLM='{...}'`` (a JSON object; ``1`` or ``{}`` for the defaults):
   for launchers that cannot pass ``--additional-config``. It must be set in the
   environment of vLLM's engine process (the server inherits it).
3. ``--ec-manager-config`` naming :data:`MANAGER_QUALNAME` (vLLM 0.27+ only; the
   original switch, still honoured).

Plain data and parsing only: importing this module imports no vLLM.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from vitbatch.core import Budget
from vitbatch.core.prefetch import PrefetchLimits

logger = logging.getLogger("vllm.vitbatch")

#: The key in vLLM's ``additional_config``.
CONFIG_KEY = "vitbatch"
#: The environment switch.
ENV_VAR = "VITBATCH_VLLM"
MANAGER_CLASS_NAME = "VitBatchEncoderCacheManager"
#: What ``--ec-manager-config``'s ``encoder_cache_manager_cls`` names (vLLM 0.27+).
MANAGER_QUALNAME = f"vitbatch.adapters.vllm.{MANAGER_CLASS_NAME}"
#: Values of ``host_admission`` (see :class:`VllmOptions`).
HOST_ADMISSIONS = ("all", "repeated")


#: Prefetch option -> the :class:`~vitbatch.core.prefetch.PrefetchLimits` field it sets.
_PREFETCH_LIMITS = {
    "prefetch_requests": "max_requests",
    "prefetch_max_cost": "max_cost",
    "prefetch_max_items": "max_items",
    "prefetch_pool_bytes": "max_pool_bytes",
}


def _check_int(name: str, value: Any, source: str, *, minimum: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null (no limit)" if allow_none else "")
        raise ValueError(f"vitbatch option {name} in {source}: got {value!r}; expected {allowed}")


@dataclass(frozen=True)
class VllmOptions:
    """The options every switch accepts.

    :param max_batch_patches: encoder cost units (patches before merging for the
        Qwen-VL family, embedding rows otherwise) in one encoder call; ``None``
        (the default) for no limit. vLLM's scheduler already bounds a step's
        encoder work by its encoder compute budget, so an extra limit only
        splits the step into more calls (on the H100, 16384 doubled the calls
        of the ``mixed`` bench and cost 10 % throughput); set it to bound the
        call's activation memory below what vLLM's budget allows.
    :param max_batch_items: items in one encoder call; ``None`` for no limit.
    :param host_cache_bytes: size of the host tier on each worker; 0 disables it.
    :param host_cache_embeds: the same bound in embedding rows (overrides
        ``host_cache_bytes``; the scheduler counts rows, like vLLM's cache).
    :param check_finite: debugging aid: refuse encoder outputs holding NaN/Inf
        (the step then runs vLLM's own path); costs a device sync per call.
    :param prefetch: encode the items of *waiting* requests ahead of their
        admission, on a side stream beside the step's forward (off by default
        until measured on the GPU). The four limits below bound it:
    :param prefetch_requests: waiting requests looked at each step, in vLLM's queue order.
    :param prefetch_max_cost: encoder cost (patches) started per step.
    :param prefetch_max_items: items started per step.
    :param prefetch_pool_bytes: device bytes of prefetched embeddings held at once
        on each worker, outside vLLM's encoder cache and KV budget: size it from
        the memory vLLM leaves free (``1 - gpu_memory_utilization`` of the GPU,
        less the encoder's activations).
    :param host_admission: which entries vLLM evicts go to the host tier.
        ``"all"`` (the default): every one - the second request for an image may
        come only after its eviction (the ``reask`` bench: 1.6x there). ``"repeated"``:
        only images at least two requests asked for before the eviction; on
        traffic whose images never return no demotion is made (no device-to-host
        copies, no arena), but an image asked again only after its first
        eviction is encoded again (``reask`` then gains nothing).
    """

    max_batch_patches: int | None = None
    max_batch_items: int | None = 64
    host_cache_bytes: int = 1 << 30
    host_cache_embeds: int | None = None
    check_finite: bool = False
    prefetch: bool = False
    prefetch_requests: int = 4
    prefetch_max_cost: int = 8192
    prefetch_max_items: int = 16
    prefetch_pool_bytes: int = 1 << 30
    host_admission: str = "all"

    @classmethod
    def parse(cls, config: Mapping[str, Any] | None, source: str) -> VllmOptions:
        """Options from a mapping; an unknown key or a bad value raises, naming ``source``."""
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"vitbatch options in {source}: expected a JSON object: {config!r}")
        config = dict(config or {})
        if "max_batch_tokens" in config:  # the name before 0.2; same unit (patches)
            if "max_batch_patches" in config:
                raise ValueError(
                    f"vitbatch options in {source}: give max_batch_patches only "
                    "(max_batch_tokens is its old name)"
                )
            logger.warning("vitbatch: option max_batch_tokens is now max_batch_patches")
            config["max_batch_patches"] = config.pop("max_batch_tokens")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"vitbatch options in {source}: unknown key(s) {unknown}; "
                f"expected some of {sorted(known)}"
            )
        for name, minimum, allow_none in (
            ("max_batch_patches", 1, True),
            ("max_batch_items", 1, True),
            ("host_cache_bytes", 0, False),
            ("host_cache_embeds", 0, True),
            *((name, 1, False) for name in _PREFETCH_LIMITS),
        ):
            if name in config:
                _check_int(name, config[name], source, minimum=minimum, allow_none=allow_none)
        for name in ("check_finite", "prefetch"):
            if not isinstance(config.get(name, False), bool):
                raise ValueError(
                    f"vitbatch option {name} in {source}: got {config[name]!r}; "
                    "expected true or false"
                )
        if config.get("host_admission", "all") not in HOST_ADMISSIONS:
            raise ValueError(
                f"vitbatch option host_admission in {source}: got {config['host_admission']!r}; "
                f"expected one of {list(HOST_ADMISSIONS)}"
            )
        return cls(**config)

    @property
    def budget(self) -> Budget:
        return Budget(self.max_batch_patches, self.max_batch_items)

    @property
    def prefetch_limits(self) -> PrefetchLimits | None:
        """The prefetch bounds, or ``None`` when prefetch is off."""
        if not self.prefetch:
            return None
        return PrefetchLimits(
            **{limit: getattr(self, option) for option, limit in _PREFETCH_LIMITS.items()}
        )

    def host_capacity_embeds(self, bytes_per_embed: int) -> int:
        """The host tier's bound in embedding rows."""
        if self.host_cache_embeds is not None:
            return self.host_cache_embeds
        return self.host_cache_bytes // max(1, bytes_per_embed)


def _from_env() -> VllmOptions | None:
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw in ("", "0", "false"):
        return None
    if raw in ("1", "true"):
        return VllmOptions()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"vitbatch: {ENV_VAR}={raw!r} is not JSON ({error}); "
            'expected 1 or a JSON object such as {"max_batch_patches": 16384}'
        ) from None
    return VllmOptions.parse(config, ENV_VAR)


def configured_options(vllm_config: Any) -> VllmOptions | None:
    """vitbatch's options if ``vllm_config`` (or the environment) switches it on, else ``None``.

    :raises ValueError: a switch is set with a bad value (vLLM then fails to start,
        with this message).
    """
    additional = getattr(vllm_config, "additional_config", None)
    if isinstance(additional, Mapping) and CONFIG_KEY in additional:
        value = additional[CONFIG_KEY]
        source = f'--additional-config "{CONFIG_KEY}"'
        if value is False or value is None:
            return None
        if value is not True and not isinstance(value, Mapping):
            raise ValueError(
                f"vitbatch options in {source}: got {value!r}; expected true (the defaults), "
                'false or null (off), or a JSON object of options such as {"max_batch_items": 64}'
            )
        return VllmOptions.parse({} if value is True else value, source)
    from_env = _from_env()
    if from_env is not None:
        return from_env
    ec_config = getattr(vllm_config, "ec_manager_config", None)
    if ec_config is not None and getattr(ec_config, "encoder_cache_manager_cls", None) in (
        MANAGER_QUALNAME,
        f"vitbatch.adapters.vllm.scheduler.{MANAGER_CLASS_NAME}",
    ):
        return VllmOptions.parse(getattr(ec_config, "manager_config", None), "--ec-manager-config")
    return None


_near_misses_warned: set[str] = set()


def near_misses(vllm_config: Any) -> list[str]:
    """Top-level ``additional_config`` keys that look like a misspelt ``vitbatch``."""
    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, Mapping) or CONFIG_KEY in additional:
        return []
    return [
        key
        for key in additional
        if isinstance(key, str)
        and difflib.get_close_matches(key.lower(), [CONFIG_KEY], n=1, cutoff=0.8)
    ]


def check_config(vllm_config: Any) -> VllmOptions | None:
    """vitbatch's options, checked where vLLM first builds its config (before any model loads).

    Warns once per key about a top-level ``additional_config`` key close to
    ``vitbatch`` (vitbatch then stays off, as vLLM passes the key on unread).

    :raises ValueError: as :func:`configured_options`.
    """
    for key in near_misses(vllm_config):
        if key not in _near_misses_warned:
            _near_misses_warned.add(key)
            logger.warning(
                "vitbatch: --additional-config has key %r, not %r: vitbatch stays off "
                "(did you mean %r?)",
                key,
                CONFIG_KEY,
                CONFIG_KEY,
            )
    return configured_options(vllm_config)
