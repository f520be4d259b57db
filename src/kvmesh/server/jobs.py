"""Request bodies -> Jobs: tokenize and validate once, with the engine's input processor.

Run on a worker thread (`asyncio.to_thread`), never on the event loop: tokenizing a long
prompt or applying a chat template must not stall other streams.
"""

from __future__ import annotations

from http import HTTPStatus

from kvmesh.engine.input_processor import InputProcessor
from kvmesh.server.errors import APIError
from kvmesh.server.handlers import Job
from kvmesh.server.protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.server.tools import plan, render_messages, template_uses_tools
from kvmesh.tenants import Tenant, cache_salt
from kvmesh.types import TenantClass


def _bad(exc: Exception) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, str(exc))


def _salt(body_salt: str | None, tenant: Tenant | None) -> str | None:
    return cache_salt(tenant.salt if tenant is not None else None, body_salt)


def _priority(body_priority: int, tenant: Tenant | None) -> int:
    """A client may make its request less urgent than its tenant's class, never more."""
    return body_priority if tenant is None else max(tenant.priority, body_priority)


def _class(tenant: Tenant | None) -> TenantClass | None:
    return tenant.request_class if tenant is not None else None


def completion_job(inputs: InputProcessor, model: str, body: CompletionRequest,
                   tenant: Tenant | None) -> Job:
    if body.echo or body.suffix:
        raise APIError(HTTPStatus.BAD_REQUEST, "echo and suffix are not supported",
                       param="echo" if body.echo else "suffix")
    try:
        params = body.sampling(body.max_tokens, body.logprobs)
        prompts = [inputs.process(p, params) for p in body.prompts()]
    except ValueError as exc:
        raise _bad(exc) from exc
    return Job("completion", model, prompts, params, _priority(body.priority, tenant),
               _salt(body.cache_salt, tenant), body.stream, body.include_usage,
               tenant=_class(tenant), result_cache=body.result_cache)


def chat_job(inputs: InputProcessor, model: str, body: ChatCompletionRequest,
             tenant: Tenant | None) -> Job:
    try:
        tools = plan(body.tools, body.tool_choice, body.parallel_tool_calls)
        forced = tools.constraint() if tools else None
        if forced is not None and body.structured() is not None:
            raise ValueError("a forced tool call cannot also take a response_format")
        messages, kwargs = render_messages(
            body.template_messages(), tools, template_uses_tools(inputs.tokenizer.chat_template))
        ids = inputs.chat_ids(messages, add_generation_prompt=body.add_generation_prompt,
                              **{**kwargs, **(body.chat_template_kwargs or {})})
        limit = body.max_completion_tokens or body.max_tokens
        max_tokens = limit if limit is not None else inputs.default_max_tokens(ids)
        top = body.top_logprobs or 0
        params = body.sampling(max_tokens, top if body.logprobs else None, forced)
        inputs.validate(ids, params.max_tokens)
        inputs.check_sampling(params)
    except ValueError as exc:
        raise _bad(exc) from exc
    return Job("chat", model, [ids], params, _priority(body.priority, tenant),
               _salt(body.cache_salt, tenant), body.stream, body.include_usage, top,
               tenant=_class(tenant), tools=tools, result_cache=body.result_cache,
               is_output_capped=limit is not None)
