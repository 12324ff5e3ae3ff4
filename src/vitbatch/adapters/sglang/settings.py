"""vitbatch's SGLang options: the flags, the ``VITBATCH_*`` variables, and how they travel.

Why through the environment: ``ServerArgs`` keeps only its own fields, and SGLang's
scheduler processes inherit the launcher's environment and load plugins themselves.
A bad value stops the launch naming the option, on every route (``launch_server``
flags, ``VITBATCH_*`` before ``sglang.Engine(...)``), not the first image.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vitbatch.core import Budget
from vitbatch.core.prefetch import PrefetchLimits

BOOLEANS = ("enabled", "check_finite", "prefetch")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
RENAMED_ENV = "VITBATCH_MAX_TOKENS"
RENAMED_MESSAGE = (
    "vitbatch: --vit-batch-max-tokens / VITBATCH_MAX_TOKENS (embedding tokens) was replaced by "
    "--vit-batch-max-patches / VITBATCH_MAX_PATCHES: vision patches per encoder call before "
    "spatial merging, the unit of every vitbatch budget (4 patches per token for 2x2-merge "
    "models such as Qwen2.5-VL; default 16384)"
)


def parse_bool(variable: str, raw: str) -> bool:
    """``1/0 true/false yes/no on/off`` (any case); anything else stops the launch."""
    word = raw.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise ValueError(
        f"vitbatch: {variable}={raw!r}: expected one of {'/'.join(TRUE + FALSE)} (any case)"
    )


@dataclass(frozen=True)
class Settings:
    """What the flags say, in the form that travels through the environment.

    ``cache_mb`` is deprecated and ignored (still validated, so an old launch
    line with a bad value fails as before): vitbatch's device cache is SGLang's
    own, sized by ``SGLANG_VLM_CACHE_SIZE_MB`` — the memory SGLang sets aside
    from the KV-cache budget — so there is no second bound to choose.
    """

    enabled: bool = False
    max_patches: int = 16384
    max_items: int = 64
    cache_mb: int | None = None
    host_cache_mb: int = 0
    check_finite: bool = False
    prefetch: bool = False
    prefetch_requests: int = PrefetchLimits.max_requests
    prefetch_max_patches: int = PrefetchLimits.max_cost
    prefetch_max_items: int = PrefetchLimits.max_items
    prefetch_pool_mb: int = PrefetchLimits.max_pool_bytes >> 20

    ENV = {
        "enabled": "VITBATCH_ENABLE",
        "check_finite": "VITBATCH_CHECK_FINITE",
        "max_patches": "VITBATCH_MAX_PATCHES",
        "max_items": "VITBATCH_MAX_ITEMS",
        "cache_mb": "VITBATCH_CACHE_MB",
        "host_cache_mb": "VITBATCH_HOST_CACHE_MB",
        "prefetch": "VITBATCH_PREFETCH",
        "prefetch_requests": "VITBATCH_PREFETCH_REQUESTS",
        "prefetch_max_patches": "VITBATCH_PREFETCH_MAX_PATCHES",
        "prefetch_max_items": "VITBATCH_PREFETCH_MAX_ITEMS",
        "prefetch_pool_mb": "VITBATCH_PREFETCH_POOL_MB",
    }
    FLAGS = {
        "max_patches": "vit_batch_max_patches",
        "max_items": "vit_batch_max_items",
        "cache_mb": "vit_batch_cache_mb",
        "host_cache_mb": "vit_batch_host_cache_mb",
    }
    PREFETCH_FLAGS = {  # each an integer >= 1 (a bound of the look-ahead, never "off")
        "prefetch_requests": "vit_batch_prefetch_requests",
        "prefetch_max_patches": "vit_batch_prefetch_max_patches",
        "prefetch_max_items": "vit_batch_prefetch_max_items",
        "prefetch_pool_mb": "vit_batch_prefetch_pool_mb",
    }

    def __post_init__(self) -> None:
        """A bad value stops the launch here, naming the flag, not at the first image."""
        for name, flag in self.FLAGS.items():
            value = getattr(self, name)
            if value is None and name == "cache_mb":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"vitbatch: --{flag.replace('_', '-')} / {self.ENV[name]} must be an integer "
                    f">= 0 (0: {'unbounded' if name.startswith('max_') else 'off'}), got {value!r}"
                )
        for name, flag in self.PREFETCH_FLAGS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"vitbatch: --{flag.replace('_', '-')} / {self.ENV[name]} must be an integer "
                    f">= 1, got {value!r}"
                )
        if self.prefetch and not self.enabled:
            raise ValueError(
                "vitbatch: --vit-batch-prefetch / VITBATCH_PREFETCH=1 needs vitbatch on "
                "(--enable-vit-batching / VITBATCH_ENABLE=1): the prefetch fills the cache "
                "vitbatch's step reads"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        if environ.get(RENAMED_ENV):
            raise ValueError(RENAMED_MESSAGE)
        values: dict[str, Any] = {}
        for name, variable in cls.ENV.items():
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            if name in BOOLEANS:
                values[name] = parse_bool(variable, raw)
            else:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r}: expected an integer") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        env = {}
        for name, variable in self.ENV.items():
            value = getattr(self, name)
            if name in BOOLEANS:
                env[variable] = "1" if value else "0"
            elif value is not None:
                env[variable] = str(value)
        return env

    def budget(self) -> Budget:
        """Budget in encoder patches (``Item.cost``, see :func:`core_item`)."""
        return Budget(self.max_patches or None, self.max_items or None)

    def prefetch_limits(self) -> PrefetchLimits:
        """The look-ahead bounds (:mod:`vitbatch.core.prefetch`), in the core's units."""
        return PrefetchLimits(
            max_requests=self.prefetch_requests,
            max_cost=self.prefetch_max_patches,
            max_items=self.prefetch_max_items,
            max_pool_bytes=self.prefetch_pool_mb << 20,
        )

    def deprecation(self) -> str | None:
        """The warning a deprecated setting earns, or ``None``."""
        if self.cache_mb is None:
            return None
        return (
            f"vitbatch: --vit-batch-cache-mb / VITBATCH_CACHE_MB ({self.cache_mb}) is deprecated "
            "and ignored: vitbatch now shares SGLang's embedding cache, sized by "
            "SGLANG_VLM_CACHE_SIZE_MB (0 turns it off); --vit-batch-host-cache-mb adds a host tier"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add vitbatch's options to SGLang's argument parser.

    Defaults are ``None`` so that an option not given leaves a ``VITBATCH_*``
    value the user exported untouched.
    """
    defaults = Settings()
    group = parser.add_argument_group("vitbatch (cross-request ViT batching)")
    group.add_argument(
        "--enable-vit-batching",
        action="store_true",
        help="Encode the images of all requests of a step in token-budgeted ViT calls (vitbatch).",
    )
    group.add_argument(
        "--vit-batch-max-patches",
        type=int,
        default=None,
        help="Most vision patches (before spatial merging) per vision-encoder call, 0: unbounded "
        f"(default {defaults.max_patches}).",
    )
    group.add_argument("--vit-batch-max-tokens", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument(
        "--vit-batch-check-finite",
        action="store_true",
        default=None,
        help="Debugging aid: refuse encoder outputs holding NaN/Inf (naming the item) and let "
        "SGLang's own path serve that step. Costs a device sync per encoder call.",
    )
    group.add_argument(
        "--vit-batch-max-items",
        type=int,
        default=None,
        help=f"Most items per vision-encoder call, 0: unbounded (default {defaults.max_items}).",
    )
    group.add_argument(
        "--vit-batch-cache-mb",
        type=int,
        default=None,
        help="Deprecated, ignored: vitbatch uses SGLang's embedding cache "
        "(size it with SGLANG_VLM_CACHE_SIZE_MB).",
    )
    group.add_argument(
        "--vit-batch-host-cache-mb",
        type=int,
        default=None,
        help="Pinned host tier keeping evicted embeddings, MiB, 0: off "
        f"(default {defaults.host_cache_mb}).",
    )
    group.add_argument(
        "--vit-batch-prefetch",
        action="store_true",
        default=None,
        help="Encode the images of waiting requests ahead of their admission, on a side CUDA "
        "stream while the step runs, into SGLang's embedding cache (off by default).",
    )
    group.add_argument(
        "--vit-batch-prefetch-requests",
        type=int,
        default=None,
        help="Waiting requests the prefetch looks at, in queue order "
        f"(default {defaults.prefetch_requests}).",
    )
    group.add_argument(
        "--vit-batch-prefetch-max-patches",
        type=int,
        default=None,
        help="Most vision patches the prefetch starts per scheduler step "
        f"(default {defaults.prefetch_max_patches}).",
    )
    group.add_argument(
        "--vit-batch-prefetch-max-items",
        type=int,
        default=None,
        help=f"Most items the prefetch starts per step (default {defaults.prefetch_max_items}).",
    )
    group.add_argument(
        "--vit-batch-prefetch-pool-mb",
        type=int,
        default=None,
        help="Most MiB of prefetched embeddings not yet used, held at once "
        f"(default {defaults.prefetch_pool_mb}).",
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """The environment's settings, overridden by the options actually given."""
    if getattr(args, "vit_batch_max_tokens", None) is not None:
        raise ValueError(RENAMED_MESSAGE)
    base = Settings.from_env(environ)
    given = {
        name: getattr(args, flag)
        for name, flag in {**Settings.FLAGS, **Settings.PREFETCH_FLAGS}.items()
        if getattr(args, flag, None) is not None
    }
    enabled = base.enabled or bool(getattr(args, "enable_vit_batching", False))
    check_finite = base.check_finite or bool(getattr(args, "vit_batch_check_finite", False))
    prefetch = base.prefetch or bool(getattr(args, "vit_batch_prefetch", False))
    return replace(base, enabled=enabled, check_finite=check_finite, prefetch=prefetch, **given)
