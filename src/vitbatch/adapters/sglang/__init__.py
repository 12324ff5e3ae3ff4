"""SGLang adapter: vitbatch behind SGLang's per-step multimodal embedding.

Switch it on with ``--enable-vit-batching`` (``launch_server``) or
``VITBATCH_ENABLE=1`` before ``sglang.Engine(...)``; SGLang 0.5.19 to 0.5.23.
A bad value stops the launch naming the option.

One module per job:

* :mod:`.settings` - the options, their flags and ``VITBATCH_*`` variables;
* :mod:`.entry` - :func:`register` (the ``sglang.srt.plugins`` entry point) and
  the hooks it registers;
* :mod:`.state` - this scheduler process's batcher and counters;
* :mod:`.step` - the interception of SGLang's step embedding;
* :mod:`.items` - SGLang's items as core items (keys shared by the step and the prefetch);
* :mod:`.cache` - SGLang's embedding cache as vitbatch's device tier;
* :mod:`.prefetch`, :mod:`.side_stream`, :mod:`.loop` - the encoder prefetch
  (``--vit-batch-prefetch``): its pool, its one place of stream switching, and the
  hook on the scheduler loop;
* :mod:`.surface` - the only package that imports SGLang or touches its
  internals (one module per job, read through the package alone); the start-up
  check is generated from its accessors.
"""

from __future__ import annotations

from vitbatch.adapters.sglang.entry import register
from vitbatch.adapters.sglang.settings import Settings, add_cli_args, settings_from_args
from vitbatch.adapters.sglang.state import AdapterState, get_state, reset_state
from vitbatch.adapters.sglang.step import Unsupported, chunked_prefill_embedding, core_item

__all__ = [
    "AdapterState",
    "Settings",
    "Unsupported",
    "add_cli_args",
    "chunked_prefill_embedding",
    "core_item",
    "get_state",
    "register",
    "reset_state",
    "settings_from_args",
]
