"""The flag end to end, through SGLang's own plugin loader and argument parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.plugins")

ROOT = Path(__file__).resolve().parents[2]
MODEL_ARGS = ["--model-path", "/nonexistent/tiny-vlm", "--device", "cpu"]


def run_launcher(args: list[str], **env: str) -> dict:
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VITBATCH_") and k != "SGLANG_PLUGINS"
    }
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # this checkout
    done = subprocess.run(
        [sys.executable, "-m", "tests.sglang.scheduler_probe", *MODEL_ARGS, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_entry_point_is_found_by_sglangs_loader() -> None:
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    from vitbatch.adapters.sglang import register

    plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert plugins["vitbatch"][0] is register
    assert plugins["vitbatch"][1] == "vitbatch"


def test_flag_reaches_the_spawned_scheduler() -> None:
    result = run_launcher(
        [
            "--enable-vit-batching",
            "--vit-batch-max-patches",
            "2048",
            "--vit-batch-host-cache-mb",
            "64",
        ]
    )
    assert "error" not in result, result.get("error")
    assert result["launcher_patched"] is True
    assert result["scheduler"] == {
        "patched": True,
        "enabled": True,
        "max_patches": 2048,
        "host_cache_mb": 64,
        "budget_patches": 2048,
        "prefetch": [False, 1 << 30],
    }


def test_installed_but_not_enabled_patches_nothing() -> None:
    result = run_launcher([])
    assert "error" not in result, result.get("error")
    assert result["launcher_patched"] is False
    assert result["scheduler"]["patched"] is False and result["scheduler"]["enabled"] is False


def test_environment_route_for_the_offline_engine() -> None:
    """``VITBATCH_ENABLE=1`` before ``sglang.Engine(...)``: no flag needed."""
    result = run_launcher([], VITBATCH_ENABLE="1", VITBATCH_MAX_ITEMS="8")
    assert "error" not in result, result.get("error")
    assert result["scheduler"]["patched"] is True and result["scheduler"]["enabled"] is True


def test_sglang_allowlist_excluding_vitbatch_leaves_sglang_alone() -> None:
    result = run_launcher(["--enable-vit-batching"], SGLANG_PLUGINS="someone-else")
    assert "unrecognized arguments: --enable-vit-batching" in result.get("error", "")
    assert run_launcher([], SGLANG_PLUGINS="someone-else")["scheduler"]["patched"] is False


def test_help_lists_the_options() -> None:
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins();"
        "from sglang.srt.server_args import prepare_server_args; prepare_server_args(['--help'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    for option in (
        "--enable-vit-batching",
        "--vit-batch-max-patches",
        "--vit-batch-max-items",
        "--vit-batch-host-cache-mb",
    ):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--vit-batch-max-patches", "-5"],
            "--vit-batch-max-patches / VITBATCH_MAX_PATCHES must be an integer >= 0",
        ),
        (
            ["--vit-batch-max-items", "-1"],
            "--vit-batch-max-items / VITBATCH_MAX_ITEMS must be an integer >= 0",
        ),
        (
            ["--vit-batch-cache-mb", "-2"],
            "--vit-batch-cache-mb / VITBATCH_CACHE_MB must be an integer >= 0",
        ),
        (
            ["--vit-batch-host-cache-mb", "-64"],
            "--vit-batch-host-cache-mb / VITBATCH_HOST_CACHE_MB",
        ),
        (["--vit-batch-max-tokens", "4096"], "was replaced by --vit-batch-max-patches"),
    ],
)
def test_bad_values_stop_the_launch_naming_the_flag(args: list[str], message: str) -> None:
    """Not accepted and then raised at the first image: the launch itself fails, readably."""
    result = run_launcher(["--enable-vit-batching", *args])
    assert message in result.get("error", ""), result


def test_prefetch_flags_reach_the_scheduler() -> None:
    result = run_launcher(
        ["--enable-vit-batching", "--vit-batch-prefetch", "--vit-batch-prefetch-pool-mb", "256"]
    )
    assert "error" not in result, result.get("error")
    assert result["scheduler"]["prefetch"] == [True, 256 << 20]  # off: the test above


def test_bad_prefetch_settings_stop_the_launch() -> None:
    """A flag and a variable: the launch stops naming both spellings of the bad one."""
    result = run_launcher(
        ["--enable-vit-batching", "--vit-batch-prefetch"], VITBATCH_PREFETCH_POOL_MB="0"
    )
    message = "--vit-batch-prefetch-pool-mb / VITBATCH_PREFETCH_POOL_MB must be an integer >= 1"
    assert message in result.get("error", ""), result


def test_bad_environment_value_stops_the_launch() -> None:
    result = run_launcher(["--enable-vit-batching"], VITBATCH_MAX_ITEMS="-3")
    assert "--vit-batch-max-items / VITBATCH_MAX_ITEMS must be an integer >= 0" in result.get(
        "error", ""
    )


# What ``sglang.Engine(...)`` does on its way to the model, without one: load the plugins
# (SGLang's loader logs and swallows what a plugin raises), build ``ServerArgs`` from the
# keyword arguments, resolve them. With a bad ``VITBATCH_*`` value vitbatch's error must reach
# the caller here, before SGLang touches the (here nonexistent) model.
ENGINE_ROUTE = (
    "from sglang.srt.plugins import load_plugins; load_plugins();"
    "from sglang.srt.server_args import ServerArgs;"
    "ServerArgs(model_path='/nonexistent/tiny-vlm', device='cpu').resolve_once()"
)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"VITBATCH_ENABLE": "1", "VITBATCH_MAX_ITEMS": "-2"},
            "--vit-batch-max-items / VITBATCH_MAX_ITEMS must be an integer >= 0",
        ),
        (
            {"VITBATCH_ENABLE": "yes-please"},
            "VITBATCH_ENABLE='yes-please': expected one of 1/true/yes/on/0/false/no/off",
        ),
        (
            {"VITBATCH_ENABLE": "1", "VITBATCH_CHECK_FINITE": "2"},
            "VITBATCH_CHECK_FINITE='2': expected one of 1/true/yes/on/0/false/no/off",
        ),
    ],
    ids=["max-items", "enable", "check-finite"],
)
def test_bad_environment_values_stop_the_offline_engine_route(
    env: dict[str, str], message: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}
    environment.pop("SGLANG_PLUGINS", None)
    environment.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_ROUTE],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: vitbatch") and message in last, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("TRUE", True), ("Yes", True), ("on", True), (" 0 ", False), ("False", False)]
    + [("NO", False), ("off", False)],
)
def test_boolean_variables_take_the_usual_spellings(raw: str, value: bool) -> None:
    from vitbatch.adapters.sglang import Settings

    settings = Settings.from_env({"VITBATCH_ENABLE": raw, "VITBATCH_CHECK_FINITE": raw})
    assert settings.enabled is value and settings.check_finite is value
