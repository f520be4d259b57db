"""What the router reads from a request body before routing it (no sockets)."""

from __future__ import annotations

from kvmesh.router.prompt import view


def test_view_reads_the_output_bound_and_the_number_of_choices():
    v = view({"prompt": "hi", "max_tokens": 40, "n": 3}, {})
    assert (v.text, v.max_tokens, v.num_choices) == ("hi", 40, 3)
    chat = view({"messages": [{"role": "user", "content": "q"}],
                 "max_completion_tokens": 7, "user": "u1"}, {})
    assert (chat.text, chat.max_tokens, chat.num_choices, chat.session_id) == (
        "<user>q", 7, 1, "u1")
    odd = view({"prompt": "x", "max_tokens": -5, "n": "3"}, {"x-session-id": "s"})
    assert (odd.max_tokens, odd.num_choices, odd.session_id) == (256, 1, "s")
