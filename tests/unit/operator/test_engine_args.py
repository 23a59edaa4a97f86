"""Engine command lines per engine kind: the flags the router and scheduler rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal.api.model import ModelSpec
from shoal.operator.engine_args import (
    DEFAULT_IMAGES,
    EngineArgsError,
    engine_command,
    engine_image,
    kv_events_config,
)


def spec(**over: Any) -> ModelSpec:
    doc: dict[str, Any] = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
        "engine": {"kind": "vllm"},
        "pools": [{"name": "h100", "gpuType": "H100", "gpusPerReplica": 2, "replicas": 1}],
        "lora": {"enabled": True, "maxLoras": 3, "maxLoraRank": 32},
        "maxModelLen": 8192,
    }
    doc.update(over)
    return ModelSpec.model_validate(doc)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_vllm_command_line() -> None:
    s = spec(engine={"kind": "vllm", "args": ["--max-num-seqs", "128"]})
    cmd = engine_command(s, s.pools[0])
    assert cmd.command == ["vllm", "serve"]
    a = cmd.args
    assert a[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag(a, "--served-model-name") == "llama-8b"
    assert flag(a, "--tensor-parallel-size") == "2"
    assert "--enable-prefix-caching" in a
    assert flag(a, "--max-model-len") == "8192"
    assert "--enable-lora" in a
    assert flag(a, "--max-loras") == "3"
    assert flag(a, "--max-lora-rank") == "32"
    assert flag(a, "--port") == "8000"
    assert a[-2:] == ["--max-num-seqs", "128"]  # extra args last
    kv = json.loads(flag(a, "--kv-events-config"))
    assert kv == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "topic": "kv@$(POD_IP):8000@llama-8b",
    }


def test_vllm_without_lora_or_prefix_caching() -> None:
    s = spec(lora={"enabled": False}, engine={"kind": "vllm", "enablePrefixCaching": False})
    a = engine_command(s, s.pools[0]).args
    assert "--enable-lora" not in a and "--max-loras" not in a
    assert "--no-enable-prefix-caching" in a and "--enable-prefix-caching" not in a


def test_served_name_defaults_to_source() -> None:
    s = spec(model={"name": "Qwen/Qwen2.5-7B"})
    a = engine_command(s, s.pools[0]).args
    assert flag(a, "--served-model-name") == "Qwen/Qwen2.5-7B"


def test_sglang_command_line() -> None:
    s = spec(engine={"kind": "sglang", "enablePrefixCaching": False})
    cmd = engine_command(s, s.pools[0])
    assert cmd.command == ["python3", "-m", "sglang.launch_server"]
    a = cmd.args
    assert flag(a, "--model-path") == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag(a, "--served-model-name") == "llama-8b"
    assert flag(a, "--tp") == "2"
    assert flag(a, "--port") == "8000"
    assert flag(a, "--context-length") == "8192"
    assert flag(a, "--max-loras-per-batch") == "3"
    assert "--disable-radix-cache" in a
    assert "--enable-metrics" in a
    assert json.loads(flag(a, "--kv-events-config"))["topic"] == "kv@$(POD_IP):8000@llama-8b"


def test_sim_command_line_is_vllm_style_plus_gpu() -> None:
    s = spec(engine={"kind": "sim"}, pools=[{"name": "a", "gpuType": "A10G"}])
    cmd = engine_command(s, s.pools[0])
    assert cmd.command == ["shoal", "sim"]
    assert flag(cmd.args, "--gpu") == "A10G"
    assert flag(cmd.args, "--tensor-parallel-size") == "1"
    assert flag(cmd.args, "--served-model-name") == "llama-8b"


def test_custom_port_flows_into_args_and_topic() -> None:
    s = spec(engine={"kind": "vllm", "port": 9000})
    a = engine_command(s, s.pools[0]).args
    assert flag(a, "--port") == "9000"
    assert json.loads(flag(a, "--kv-events-config"))["topic"].endswith(":9000@llama-8b")


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("vllm", ["--tensor-parallel-size", "4"]),
        ("vllm", ["--port=9000"]),
        ("vllm", ["--served-model-name", "other"]),
        ("sglang", ["--tp", "4"]),
        ("sim", ["--gpu", "L4"]),
    ],
)
def test_extra_args_may_not_override_managed_flags(kind: str, extra: list[str]) -> None:
    s = spec(engine={"kind": kind, "args": extra})
    with pytest.raises(EngineArgsError, match=r"engine\.args sets"):
        engine_command(s, s.pools[0])


def test_images() -> None:
    assert engine_image(spec()) == DEFAULT_IMAGES[spec().engine.kind]
    assert engine_image(spec(engine={"kind": "vllm", "image": "my/vllm:1"})) == "my/vllm:1"


def test_kv_events_config_is_compact_json() -> None:
    assert " " not in kv_events_config("m", 8000)
