"""The tool conversation the tool tests share: a question, an assistant turn that called `set_alarm(hour="six",
loud=True)` as `call_1`, and the tool's result, as the engine takes messages (the call's arguments parsed)."""

from __future__ import annotations


def alarm_call_turn() -> dict:
    """The assistant turn that called `set_alarm` (a fresh dict each time, so a test may change its copy)."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "set_alarm", "arguments": {"hour": "six", "loud": True}},
            }
        ],
    }


def tool_conversation(question: str, result: str, system: str | None = None) -> list[dict]:
    """[system,] `question`, the `set_alarm` call and the tool's `result` answering it."""
    opening = [] if system is None else [{"role": "system", "content": system}]
    return [
        *opening,
        {"role": "user", "content": question},
        alarm_call_turn(),
        {"role": "tool", "content": result, "tool_call_id": "call_1"},
    ]
