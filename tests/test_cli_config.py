"""Configuration by flag, KVMESH_* environment variable and YAML/TOML file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from typer.testing import CliRunner

from kvmesh.cli_options import build_configs, load_config_file, with_config_options
from kvmesh.config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    TierConfig,
    engine_config_from_kwargs,
    split_by_section,
)

CLASSES = [ModelConfig, CacheConfig, SchedulerConfig, TierConfig, ServerConfig]


def test_flags_beat_file_and_file_beats_defaults(tmp_path):
    f = tmp_path / "kv.yaml"
    f.write_text("scheduler:\n  max_num_seqs: 7\nblock_size: 32\nport: 9001\n"
                 "api_keys: 'a:alice,b'\n")
    model, cache, sched, tiers, server = build_configs(
        CLASSES, {"port": 9100, "block_size": None}, load_config_file(f))
    assert sched.max_num_seqs == 7 and cache.block_size == 32 and server.port == 9100
    assert server.api_keys == ("a:alice", "b") and model.model == "smollm2-135m-instruct"
    assert tiers.host_bytes == 0


def test_toml_and_bad_files(tmp_path):
    t = tmp_path / "kv.toml"
    t.write_text('[tiers]\nhost_bytes = 1024\ndisk_path = "/tmp/x"\n')
    _, _, _, tiers, _ = build_configs(CLASSES, {}, load_config_file(t))
    assert tiers.host_bytes == 1024 and tiers.disk_path == "/tmp/x"
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(typer.BadParameter, match="no_such_option"):
        build_configs(CLASSES, {}, load_config_file(bad))
    with pytest.raises(ValueError, match="host tier"):
        TierConfig(disk_path="/tmp/x")
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=0)


def test_cli_help_env_and_errors(tmp_path):
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "kvmesh.cli", *a],  # noqa: E731
                                          capture_output=True, text=True, timeout=120, **kw)
    help_text = run("serve", "--help").stdout
    assert "Tokens per KV block" in help_text and "KVMESH_BLOCK_SIZE" in help_text
    assert "--cache-<field>" in help_text and "KVMESH_CACHE_<FIELD>" in help_text
    assert run("version").stdout.strip()
    bad = run("serve", "--block-size", "0", "--model", str(tmp_path))
    assert bad.returncode == 2 and "block_size" in bad.stderr
    env = dict(__import__("os").environ, KVMESH_PORT="70000")
    assert "port" in run("serve", env=env).stderr
    listing = run("model", "list").stdout
    assert "smollm2-135m-instruct" in listing


@dataclass(frozen=True)
class RouterConfig:
    """A later section whose fields collide with ServerConfig.port and SchedulerConfig.policy."""

    SECTION: ClassVar[str] = "router"
    port: int = 0
    policy: str = "round_robin"


WITH_ROUTER = [*CLASSES, RouterConfig]


def _invoke(args: list[str], env: dict[str, str] | None = None) -> list[Any]:
    """Run a tiny typer app over WITH_ROUTER; returns the built configs."""
    app = typer.Typer()
    built: list[Any] = []

    @app.command()
    @with_config_options(WITH_ROUTER)
    def main(config: Path | None = typer.Option(None, "--config"), **fields: Any) -> None:
        built.extend(build_configs(WITH_ROUTER, fields, load_config_file(config)))

    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return built


def test_colliding_section_gets_prefixed_flags_and_env():
    _, _, sched, _, server, router = _invoke(
        ["--port", "1", "--router-port", "2", "--policy", "priority", "--block-size", "32"],
        env={"KVMESH_ROUTER_POLICY": "hash"})
    assert (server.port, router.port, sched.policy, router.policy) == (1, 2, "priority", "hash")
    _, cache, sched, _, server, router = _invoke(
        ["--scheduler-policy", "priority", "--no-cache-enable-prefix-caching"],
        env={"KVMESH_PORT": "3", "KVMESH_ROUTER_PORT": "4", "KVMESH_BLOCK_SIZE": "8"})
    assert (server.port, router.port, cache.block_size) == (3, 4, 8)
    assert sched.policy == "priority" and router.policy == "round_robin"
    assert cache.enable_prefix_caching is False
    app_help = CliRunner().invoke(_help_app(), ["--help"], env={"COLUMNS": "200"}).output
    assert "--router-port" in app_help and "KVMESH_ROUTER_PORT" in app_help
    assert "--port " in app_help and "--server-port" not in app_help  # one name per field


def test_prefixed_names_follow_flag_over_env_precedence():
    *_, server, _ = _invoke(["--server-port", "5"], env={"KVMESH_PORT": "6"})
    assert server.port == 5
    *_, server, _ = _invoke(["--port", "5"], env={"KVMESH_SERVER_PORT": "6"})
    assert server.port == 5
    *_, server, _ = _invoke([], env={"KVMESH_PORT": "5", "KVMESH_SERVER_PORT": "6"})
    assert server.port == 6
    cache = _invoke(["--cache-enable-prefix-caching"],
                    env={"KVMESH_ENABLE_PREFIX_CACHING": "0"})[1]
    assert cache.enable_prefix_caching is True


def _help_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @with_config_options(WITH_ROUTER)
    def main(**fields: Any) -> None:
        pass

    return app


def test_file_sections_apply_to_their_own_class(tmp_path):
    f = tmp_path / "kv.yaml"
    f.write_text("router:\n  port: 1\nserver:\n  port: 2\npolicy: priority\n"
                 "router_policy: hash\n")
    *_, sched, _, server, router = build_configs(WITH_ROUTER, {}, load_config_file(f))
    assert (router.port, server.port, sched.policy, router.policy) == (1, 2, "priority", "hash")
    *_, server, router = build_configs(WITH_ROUTER, {"router__port": 5}, load_config_file(f))
    assert (router.port, server.port) == (5, 2)
    f.write_text("routr:\n  port: 1\n")
    with pytest.raises(typer.BadParameter, match=r"unknown config keys.*routr\.port"):
        build_configs(WITH_ROUTER, {}, load_config_file(f))
    f.write_text("port: 1\nserver:\n  port: 2\n")
    with pytest.raises(typer.BadParameter, match="server.port given twice"):
        build_configs(WITH_ROUTER, {}, load_config_file(f))


def test_split_by_section_routes_and_rejects_ambiguous_keys():
    classes = [ServerConfig, RouterConfig]
    with pytest.raises(ValueError, match="'port' is ambiguous: use server_port or router_port"):
        split_by_section(classes, {"port": 1})
    assert split_by_section(classes, {"port": 1}, first_owner_wins=True) == [{"port": 1}, {}]
    assert split_by_section(classes, {"router_port": 1, "server.port": 2, "host": "h"}) == [
        {"port": 2, "host": "h"}, {"port": 1}]
    with pytest.raises(TypeError, match="unknown config keys.*sections server, router"):
        split_by_section(classes, {"nope": 1})


def test_engine_config_from_kwargs():
    config = engine_config_from_kwargs("m", block_size=32, tiers_host_bytes=1024, max_num_seqs=4)
    assert config.model.model == "m" and config.cache.block_size == 32
    assert config.tiers.host_bytes == 1024 and config.scheduler.max_num_seqs == 4
    assert engine_config_from_kwargs().model.model == "smollm2-135m-instruct"
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        engine_config_from_kwargs("m", nope=1)
    with pytest.raises(ValueError, match="block_size"):
        engine_config_from_kwargs("m", cache_block_size=0)
