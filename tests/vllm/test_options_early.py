"""vitbatch's options are checked where vLLM builds its config, before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_qwen2vl import build_tiny_qwen2vl  # noqa: E402 - after the sys.path line above

from vitbatch import metrics  # noqa: E402
from vitbatch.adapters import vllm as adapter  # noqa: E402
from vitbatch.adapters.vllm import options  # noqa: E402


def config(additional: dict) -> SimpleNamespace:
    return SimpleNamespace(additional_config=additional, ec_manager_config=None)


@pytest.mark.parametrize("value", ["abc", 3, [1]])
def test_wrong_form_says_what_is_accepted(value, monkeypatch) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    with pytest.raises(ValueError) as error:
        options.check_config(config({"vitbatch": value}))
    message = str(error.value)
    assert f"got {value!r}" in message
    assert "expected true (the defaults)" in message and "a JSON object" in message


@pytest.mark.parametrize("value", [True, {}, {"max_batch_items": 4}])
def test_accepted_forms(value, monkeypatch) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    assert options.check_config(config({"vitbatch": value})) is not None


def test_key_close_to_vitbatch_draws_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    monkeypatch.setattr(options, "_near_misses_warned", set())
    with caplog.at_level("WARNING", logger="vllm.vitbatch"):
        for _ in range(3):
            assert options.check_config(config({"vitbach": {}, "other": 1})) is None
        assert options.check_config(config({"VitBatch": {}})) is None
        assert options.check_config(config({"vision": {}, "batch": {}})) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "vitbatch: --additional-config has key 'vitbach', not 'vitbatch': vitbatch stays off "
        "(did you mean 'vitbatch'?)",
        "vitbatch: --additional-config has key 'VitBatch', not 'vitbatch': vitbatch stays off "
        "(did you mean 'vitbatch'?)",
    ]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("options") / "tiny-qwen2vl")


def test_vllm_config_building_rejects_a_bad_option(model, monkeypatch) -> None:
    """vLLM's own EngineArgs.create_engine_config, as the server and LLM(...) call it."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    adapter.register()
    args = EngineArgs(model=str(model), max_model_len=1024, additional_config={"vitbatch": "abc"})
    with pytest.raises(ValueError, match=r"got 'abc'; expected true \(the defaults\)"):
        args.create_engine_config()


def test_vllm_config_building_sets_up_metrics_collection(model, monkeypatch, tmp_path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(metrics.DIR_ENV, str(tmp_path))
    adapter.register()
    args = EngineArgs(model=str(model), max_model_len=1024, additional_config={"vitbatch": {}})
    args.create_engine_config()
    assert isinstance(metrics._served.get(str(tmp_path)), metrics.SnapshotCollector)
