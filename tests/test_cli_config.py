"""Configuration by flag, KVMESH_* environment variable and YAML/TOML file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from kvmesh.cli_options import build_configs, load_config_file
from kvmesh.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig, TierConfig

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
    assert run("version").stdout.strip()
    bad = run("serve", "--block-size", "0", "--model", str(tmp_path))
    assert bad.returncode == 2 and "block_size" in bad.stderr
    env = dict(__import__("os").environ, KVMESH_PORT="70000")
    assert "port" in run("serve", env=env).stderr
    listing = run("model", "list").stdout
    assert "smollm2-135m-instruct" in listing
