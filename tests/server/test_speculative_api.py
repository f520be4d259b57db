"""Speculative decoding behind a real server (default model, float32), with the openai
client, by prompt lookup and with a draft model: streamed and whole answers agree, so do
the choices of n = 2, and the acceptance metrics move."""

from __future__ import annotations

import openai
import pytest

from tests.server_process import serve


@pytest.mark.slow
@pytest.mark.parametrize("method", [["ngram"], ["draft", "--speculative-model",
                                                "smollm2-135m-instruct"]], ids=["ngram", "draft"])
def test_a_speculating_server_streams_what_it_answers_and_counts_acceptance(tmp_path, method):
    text = ("Please keep this note: the meeting moved to Thursday at ten, in room four, "
            "and the budget review moved to Friday at noon, in room two.")
    with serve(["--speculative-method", *method, "--num-speculative-tokens", "3"],
               tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model=client.models.list().data[0].id, max_tokens=60, temperature=0,
                  messages=[{"role": "user", "content": f"Repeat this exactly: {text}"}])
        whole = client.chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or ""
                           for c in client.chat.completions.create(**kw, stream=True))
        assert streamed == whole and len(whole) > 20
        both = client.chat.completions.create(**kw, n=2).choices  # n > 1 speculates too
        assert [c.message.content for c in both] == [whole, whole]
        assert s.metric("spec_decode_num_accepted_tokens_total") > 0
        drafted = s.metric("spec_decode_num_draft_tokens_total")
        assert s.metric("spec_decode_num_accepted_tokens_total") <= drafted
        assert 0 < s.metric("spec_decode_acceptance_rate") <= 1
        assert s.metric("spec_decode_tokens_per_step") > 1
