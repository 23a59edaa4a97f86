"""A request without ``model`` goes to the fleet's only base model, as vLLM serves its default
model then (golden ``056_missing_model_completions``); with several models it is a clear 400."""

from __future__ import annotations

import pytest

from shoal.router.app import build_components
from shoal.router.config import RouterConfig
from shoal.router.errors import ApiError
from shoal.router.proxy import Gateway
from shoal.router.request_body import SimTokenizers, parse_body
from shoal.router.types import Endpoint

BODY = b'{"prompt": "hello world", "max_tokens": 4}'


def _gateway_serving(
    *models_per_endpoint: tuple[str, ...], adapters: dict[str, str] | None = None
) -> Gateway:
    c = build_components(RouterConfig.from_mapping({"kv_events": "off"}))
    urls = [f"http://e{i}:8000" for i in range(len(models_per_endpoint))]
    c.store.set_endpoints(Endpoint(url=u) for u in urls)
    for url, bases in zip(urls, models_per_endpoint, strict=True):
        c.store.update_models(url, bases, adapters or {})
    return c.gateway


def test_a_body_without_model_takes_the_only_base_model_adapters_aside() -> None:
    gw = _gateway_serving(("tiny",), ("tiny",), adapters={"tiny-lora": "tiny"})
    tokenizers = SimTokenizers()
    for raw in (BODY, b'{"model": null, "prompt": "hello world"}'):
        parsed = parse_body(raw, "completions", tokenizers.for_model, gw._default_model)
        assert parsed.model == "tiny"
        assert parsed.prompt_tokens == 2  # tokenized with the chosen model's tokenizer


def test_with_several_models_a_body_without_model_is_a_400_that_lists_them() -> None:
    gw = _gateway_serving(("llama",), ("qwen",))
    with pytest.raises(ApiError) as err:
        parse_body(BODY, "completions", SimTokenizers().for_model, gw._default_model)
    assert err.value.status == 400
    assert err.value.param == "model"
    assert "serves 2 models (llama, qwen)" in err.value.message


def test_with_no_model_served_it_is_a_503_with_retry_after() -> None:
    gw = _gateway_serving()
    with pytest.raises(ApiError) as err:
        parse_body(BODY, "chat", SimTokenizers().for_model, gw._default_model)
    assert err.value.status == 503
    assert err.value.retry_after_s is not None


def test_a_model_that_is_not_a_non_empty_string_is_still_a_400() -> None:
    gw = _gateway_serving(("tiny",))
    for raw in (b'{"model": "", "prompt": "x"}', b'{"model": 3, "prompt": "x"}'):
        with pytest.raises(ApiError) as err:
            parse_body(raw, "completions", SimTokenizers().for_model, gw._default_model)
        assert err.value.status == 400
